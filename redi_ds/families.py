"""Any Hugging Face causal LM, exactly, or a one-line refusal.

The fused head replaces ``lm_head(body(x))`` followed by whatever the family's ``ForCausalLM.forward`` does to the
logits. Three things make that exact:

1. **Body and head found generically**: ``get_decoder()`` and ``get_output_embeddings()``, never by attribute names;
   a head that is not one ``nn.Linear`` is refused.
2. **One table of post-head transforms** (``POST_HEAD``): a config attribute -> what it does to the logits, turned
   into a :class:`~redi_ds.kernels.transform.LogitTransform` the kernels apply exactly. Adding a family that uses a
   known convention is one line.
3. **A self-check at build time** (``check_head``), before any step and before ZeRO-3 partitions anything: on a
   short probe from the real tokenizer, the body plus the fused head must reproduce the model's own forward
   log-probs. The head is compared in float32 (or the model's float64): the body's output is the same on both sides,
   and the model's own head is made to compute in float32 for the probe, so the check is as tight in a bf16 run as in
   an fp32 one. It catches every family whose head we do not model, including ones released after today.

``check_packing`` does the same for ``data.padding_free``: with the first sequence of a packed row changed, the
second one's hidden states must not move (recurrent and linear-attention layers carry state across the boundary).
Liger's body kernels go through Liger's own per-model table (none for a family it does not know).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Callable, Iterator

import torch
from torch import nn

from redi_ds.errors import ConfigError
from redi_ds.kernels.transform import LogitTransform

# config attribute -> the LogitTransform fields it sets; what the family's ForCausalLM.forward does after lm_head
POST_HEAD: dict[str, Callable[[float], dict]] = {
    "final_logit_softcapping": lambda v: {"softcap": float(v)},   # Gemma2, Gemma3: cap * tanh(z / cap)
    "logit_scale": lambda v: {"scale": float(v)},                  # Cohere, Cohere2: z * s
    "logits_scaling": lambda v: {"scale": 1.0 / float(v)},         # Granite, GraniteMoe(Shared, Hybrid): z / s
    "lm_head_multiplier": lambda v: {"scale": float(v)},           # Falcon-H1: z * m
}

PROBE_TEXT = ("Let x be the number of apples. Then 3x + 7 = 22, so 3x = 15 and x = 5. "
              "The final answer is \\boxed{5}.")


def transform_for(config) -> LogitTransform:
    """The post-head transform of a model config (its text config, for a multimodal wrapper)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields: dict = {}
    for attr, to_fields in POST_HEAD.items():
        value = getattr(text, attr, None)
        if value is None or isinstance(value, bool):
            continue
        for k, v in to_fields(value).items():
            fields[k] = fields.get(k, 1.0) * v if k == "scale" else v
    try:
        return LogitTransform(**fields)
    except ValueError as e:
        raise ConfigError(f"model ({text.model_type}): {e}") from None


def body_and_head(hf_model) -> tuple[nn.Module, nn.Linear]:
    """(the decoder without its head, the LM head); a head that is not one Linear is a one-line ConfigError."""
    kind = getattr(hf_model.config, "model_type", type(hf_model).__name__)
    head = hf_model.get_output_embeddings()
    # a Linear subclass with its own forward (Dory's head scales every logit) is not a linear head
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ConfigError(f"model ({kind}): its LM head is {type(head).__name__}, not one nn.Linear; the fused head "
                          "can only replace a linear head (no family-specific head is supported)")
    body = hf_model.get_decoder()
    if body is hf_model or body is None:
        raise ConfigError(f"model ({kind}): no decoder body found (get_decoder() returned the model itself)")
    return body, head


@contextlib.contextmanager
def cpu_attention(hf_model) -> Iterator[None]:
    """For a probe on the CPU: an attention implementation that runs there (flash-attention does not)."""
    impl = getattr(hf_model.config, "_attn_implementation", None)
    if impl is None or "flash" not in str(impl):
        yield
        return
    other = "sdpa" if type(hf_model)._supports_sdpa else "eager"
    hf_model.set_attn_implementation(other)
    try:
        yield
    finally:
        hf_model.set_attn_implementation(impl)


def probe_ids(tokenizer, n: int = 24) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor(ids[:n], dtype=torch.long)


def _body_hidden(body, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    out = body(input_ids=ids, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def check_head(hf_model, transform: LogitTransform, kernel_options, ids: torch.Tensor) -> float:
    """Max |log p_ours - log p_model| over the probe's tokens; a one-line ConfigError when they differ.

    Ours: the body, then the fused head (this run's kernel options) with ``transform``. The model's: its own forward,
    its head computing in float32 (a forward hook) so that its post-head code runs in float32 too."""
    from redi_ds.kernels import fused_sequence_logprobs
    from redi_ds.kernels.reference import IGNORE_INDEX

    body, head = body_and_head(hf_model)
    kind = hf_model.config.model_type
    cdt = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    ids = ids.to(head.weight.device)[None]
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    weight = head.weight.detach().to(cdt)
    bias = head.bias.detach().to(cdt) if head.bias is not None else None

    def head_in_float(module, args, output):
        return nn.functional.linear(args[0].to(cdt), weight, bias)

    with cpu_attention(hf_model):
        hook = head.register_forward_hook(head_in_float)
        try:
            logits = hf_model(input_ids=ids, position_ids=pos, use_cache=False).logits
        finally:
            hook.remove()
        hidden = _body_hidden(body, ids, pos)
    theirs = torch.log_softmax(logits.to(cdt), dim=-1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    n = ids.shape[1]
    ours, _ = fused_sequence_logprobs(hidden.to(cdt), weight, targets, bias, seq_ids=torch.arange(n)[None],
                                      num_seqs=n, options=kernel_options, transform=transform)
    diff = float((ours[:-1] - theirs).abs().max())
    scale = 1.0 + float(theirs.abs().max())
    tol = (1e-9 if cdt == torch.float64 else 2e-4) * scale
    if not diff <= tol:
        raise ConfigError(
            f"model ({kind}): the fused head does not reproduce the model's own log-probs (max difference "
            f"{diff:.3g} nats per token on a {n}-token probe; post-head transform applied: {transform}); "
            f"this family changes its logits in a way redi_ds.families.POST_HEAD does not model. Use a supported "
            f"family, or add its convention to POST_HEAD")
    return diff


@torch.no_grad()
def check_packing(hf_model, ids: torch.Tensor) -> float:
    """Whether a packed row keeps its sequences apart: the second sequence's hidden states with the first one
    changed must not move. Returns the largest change (0.0 for an exact body); raises ConfigError otherwise."""
    body, _ = body_and_head(hf_model)
    kind = hf_model.config.model_type
    ids = ids.to(next(body.parameters()).device)
    a = ids[: len(ids) // 2]
    b = ids[len(ids) // 2:]
    other = torch.roll(a, 1) + 1
    other = torch.where(other >= hf_model.config.get_text_config().vocab_size, 0, other)
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(ids.device)[None]
    with cpu_attention(hf_model):
        h1 = _body_hidden(body, torch.cat([a, b])[None], pos)[0, len(a):]
        h2 = _body_hidden(body, torch.cat([other, b])[None], pos)[0, len(a):]
        alone = _body_hidden(body, b[None], torch.arange(len(b), device=ids.device)[None])[0]
    # exact: nothing of the first sequence may reach the second (a leak through state or a mask moves it)
    moved = float((h1 - h2).abs().max() / h1.abs().max().clamp(min=1e-30))
    # to rounding: packed at restarted positions is the sequence alone (some families' softmax runs in fp32)
    off = float((h1 - alone).abs().max() / alone.abs().max().clamp(min=1e-30))
    if moved > 0 or off > max(1e-3, 64 * torch.finfo(h1.dtype).eps):
        raise ConfigError(
            f"data.padding_free: true mixes the sequences of a packed row in this model ({kind}): the second "
            f"sequence's hidden states move by {max(moved, off):.2g} (relative) when the first one changes or is "
            f"removed (recurrent or linear-attention layers carry state across the boundary); set "
            f"data.padding_free: false (padded rows are exact)")
    return max(moved, off)


def self_check(hf_model, tokenizer, kernel_options, padding_free: bool) -> str:
    """Both checks, on the probe of this run's tokenizer, before any step (and before ZeRO-3 partitions the model:
    it is whole here). Returns the line that says what was verified; raises a one-line ConfigError otherwise."""
    from redi_ds.kernels.options import resolve_impl

    on_cuda = next(hf_model.parameters()).is_cuda
    options = kernel_options
    if resolve_impl(options.impl, on_cuda) == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        options = options.with_(impl="torch")  # the model is checked where it is built, on the CPU: the twin
    ids = probe_ids(tokenizer)
    transform = transform_for(hf_model.config)
    diff = check_head(hf_model, transform, options, ids)
    line = (f"model {hf_model.config.model_type}: body + fused head reproduce its own log-probs to {diff:.1e} "
            f"(post-head transform: {transform}; {len(ids)}-token probe)")
    if padding_free:
        check_packing(hf_model, ids)
        line += "; packed rows keep their sequences apart"
    return line


# ----------------------------------------------------------------------------- Liger's body kernels


LIGER_BODY = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True, "layer_norm": True,
              "cross_entropy": False, "fused_linear_cross_entropy": False}


def liger_for(model_type: str):
    """Liger-Kernel's own patch function for this family, or None (it has none)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)


def apply_liger(model, mode: str) -> bool:
    """Liger-Kernel's body kernels (RMSNorm, RoPE, SwiGLU/GeGLU, LayerNorm; never its cross-entropy) on CUDA,
    through Liger's own per-family table: the right kernels per family, none for a family it does not know."""
    kind = model.config.model_type
    if mode == "off":
        return False
    if not torch.cuda.is_available():
        if mode == "on":
            raise ConfigError("model.liger: on needs CUDA")
        return False
    try:
        fn = liger_for(kind)
    except ImportError:
        if mode == "on":
            raise ConfigError("model.liger: on, but liger-kernel is not installed (pip install redi-ds[gpu])")
        return False
    if fn is None:
        if mode == "on":
            raise ConfigError(f"model.liger: on, but Liger-Kernel has no kernels for model type {kind!r}")
        return False
    params = inspect.signature(fn).parameters
    fn(model=model, **{k: v for k, v in LIGER_BODY.items() if k in params})
    return True
