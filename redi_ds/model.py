"""Model loading and the body/head split.

    PolicyModel(batch, coeffs) ─> body (the HF model without its LM head) ─> hidden [R, T, H]
                               ─> FusedHead (owns lm_head.weight)       ─> per-sequence log-prob sums

The head's loss runs inside ``FusedHead.forward``: under ZeRO-3, DeepSpeed's module hooks gather
``lm_head.weight`` for exactly that call and reduce-scatter its gradient afterwards, tied embeddings
included (the head holds the very Parameter the embedding holds, so both gradients accumulate on it).
No [tokens x vocab] logits are made unless ``kernel.impl: reference``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from redi_ds.config import ModelConfig
from redi_ds.errors import ConfigError
from redi_ds.eval.errors import EvalError
from redi_ds.eval.prompting import resolve_chat_template, resolve_tokenizer
from redi_ds.kernels.options import FusedHeadOptions
from redi_ds.kernels.transform import IDENTITY, LogitTransform
from redi_ds.losses.base import StepTotals

def resolve_model_path(name_or_path: str, output_dir: str) -> str:
    """``@sft`` -> ``{output_dir}/sft/export`` (REDI starts from the SFT export), only once that stage is done (its
    ``done`` marker: an export a killed run left half-written is never read)."""
    if name_or_path.startswith("@"):
        stage = Path(output_dir) / name_or_path[1:]
        if not (stage / "done").is_file():
            raise ConfigError(f"model.name_or_path = {name_or_path}: the {name_or_path[1:]} stage in {stage} is not "
                              f"finished (no done marker); run --stage {name_or_path[1:]} first, or set "
                              "model.sft_if_missing: true to run it before this one")
        return str(stage / "export")
    return name_or_path


def load_tokenizer(model_cfg: ModelConfig, model_path: str):
    from redi_ds.hf_tokenizer import auto_tokenizer

    src = model_cfg.tokenizer
    if src is None:
        src = "qwen2.5" if model_path == "tiny" else model_path
    src = resolve_tokenizer(src)  # a bundled name (qwen2.5, arith) or a path / hub name
    try:
        tok = auto_tokenizer(src)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model.tokenizer: cannot load {src!r} ({type(e).__name__})") from None
    if model_cfg.chat_template:
        try:
            tok.chat_template = resolve_chat_template(model_cfg.chat_template)  # a bundled name or a .jinja
        except EvalError as e:
            raise ConfigError(f"model.chat_template: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    _check_template(tok.chat_template, model_cfg.chat_template or src)
    return tok


def _check_template(template, where: str) -> None:
    """A chat template that does not compile is a one-line ConfigError naming it and its line."""
    if not isinstance(template, str):
        return
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template  # transformers' own environment

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        raise ConfigError(f"model.chat_template: {where}: line {e.lineno}: Jinja syntax error ({e.message})"
                          ) from None


def causal_lm_class(config):
    """The family's ForCausalLM class; a one-line ConfigError for a config transformers has none for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ConfigError(f"model ({config.model_type}): transformers has no causal LM class for this config "
                          "(not a decoder-only language model?)") from None


def attention_for(model_cls, requested: str, cuda: bool) -> str:
    """``auto``: flash-attention on CUDA where it is installed and the family supports it, else sdpa where the
    family supports it, else eager. An implementation the family does not support is a one-line ConfigError."""
    supports = {"flash_attention_2": model_cls._supports_flash_attn, "sdpa": model_cls._supports_sdpa, "eager": True}
    if requested != "auto":
        if not supports.get(requested, False):
            raise ConfigError(f"model.attn_implementation = {requested}: {model_cls.__name__} does not support it "
                              f"(supported: {', '.join(k for k, ok in supports.items() if ok)}; or auto)")
        return requested
    if cuda and supports["flash_attention_2"]:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa" if supports["sdpa"] else "eager"


def _tiny_config(model_cfg: ModelConfig, tokenizer):
    """The embedded default: a Qwen2-architecture config of model.tiny's sizes (special tokens from ``tokenizer``:
    Qwen's when None)."""
    import transformers

    t = model_cfg.tiny
    bos, eos = 151643, 151645  # Qwen2.5's <|endoftext|>, <|im_end|>
    if tokenizer is not None:
        if len(tokenizer) > t.vocab_size:
            raise ConfigError(f"model.tiny.vocab_size = {t.vocab_size} is smaller than the tokenizer's "
                              f"{len(tokenizer)} tokens")
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return transformers.Qwen2Config(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings, rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings, bos_token_id=bos, eos_token_id=eos,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def build_model(model_cfg: ModelConfig, model_path: str, dtype: torch.dtype, seed: int = 0, tokenizer=None):
    """An HF causal LM: the tiny default built from its config, or from_pretrained(path or hub name), with the
    attention implementation its family supports. A model that cannot load is a one-line ConfigError."""
    import transformers

    if model_path == "tiny":
        config = _tiny_config(model_cfg, tokenizer)
    else:
        if os.path.sep in model_path and not os.path.isdir(model_path):
            raise ConfigError(f"model.name_or_path: {model_path!r} does not exist")
        try:
            config = transformers.AutoConfig.from_pretrained(model_path)
        except Exception as e:  # noqa: BLE001 - any failure to read a config is one line
            raise ConfigError(f"model.name_or_path: cannot read the config of {model_path!r} ({_first_line(e)})"
                              ) from None
    _override_rope(config, model_cfg)
    cls = causal_lm_class(config)
    attn = attention_for(cls, model_cfg.attn_implementation, torch.cuda.is_available())
    try:
        if model_path == "tiny":
            torch.manual_seed(seed)  # every rank builds the same initial weights
            model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
        else:
            model = cls.from_pretrained(model_path, config=config, dtype=dtype, attn_implementation=attn)
    except Exception as e:  # noqa: BLE001 - a model that cannot load is one line, never a traceback
        raise ConfigError(f"model.name_or_path: cannot load {model_path!r} as {cls.__name__} with "
                          f"attention {attn} ({_first_line(e)})") from None
    if model_cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _override_rope(config, model_cfg: ModelConfig) -> None:
    if model_cfg.rope_theta is not None:
        config.rope_theta = model_cfg.rope_theta
        rp = getattr(config, "rope_parameters", None)
        if isinstance(rp, dict):
            rp["rope_theta"] = model_cfg.rope_theta
    if model_cfg.max_position_embeddings is not None:
        config.max_position_embeddings = model_cfg.max_position_embeddings


class Unhooked:
    """Carries a value past DeepSpeed's ZeRO-3 module hooks, which look for tensors only in tensors, tuples,
    lists and dicts. A linear loss's head forms every gradient in its forward pass, so its module must not
    schedule the backward gather of the [V, H] weight that DeepSpeed's pre-backward hook would make (the
    forward gather, and the reduce-scatter of the weight's gradient, still happen as usual)."""

    def __init__(self, value):
        self.value = value  # a tuple: DeepSpeed's post-forward hook reads vars() for parameters, finds none


class FusedHead(nn.Module):
    """Replaces ``lm_head``: holds the same weight (and bias) Parameters, computes log-probs, not logits.

    ``forward(hidden, targets, seq_ids, num_seqs)`` -> (None, sums, counts): differentiable sums, the
    two-pass form (its backward needs the weight, so DeepSpeed gathers it for the backward too).
    ``forward(hidden, targets, seq_ids, num_seqs, coeffs)`` -> (share, sums, counts): a linear loss in one
    pass, gradients formed in forward. Wrapped as ``forward(Unhooked((...)))`` -> ``Unhooked((...))`` the
    same call hides from DeepSpeed's backward hooks (see PolicyModel: tied heads only).
    """

    def __init__(self, lm_head: nn.Linear, options: FusedHeadOptions, transform: LogitTransform = IDENTITY):
        super().__init__()
        self.weight = lm_head.weight
        self.bias = lm_head.bias
        self.options = options
        self.transform = transform  # what the family's forward does to the logits (redi_ds.families)

    def forward(self, hidden, targets=None, seq_ids=None, num_seqs=None, coeffs=None, token_coeffs=None,
                view: str = "sums"):
        """``view``: "sums" (the training forms above), "tokens" (per-token log-probs of ``targets``, no gradient:
        a teacher's scores) or "logits" (the transformed logits of the few positions given: sampling). Every view
        runs inside this forward, so ZeRO-3 gathers the weight for it."""
        if isinstance(hidden, Unhooked):
            return Unhooked(self._head(*hidden.value))
        if view == "tokens":
            from redi_ds import kernels

            return kernels.fused_token_logprobs(hidden, self.weight, targets, self.bias, options=self.options,
                                                transform=self.transform)
        if view == "logits":
            return self.transform.apply(nn.functional.linear(hidden, self.weight, self.bias))
        return self._head(hidden, targets, seq_ids, num_seqs, coeffs, token_coeffs)

    def _head(self, hidden, targets, seq_ids, num_seqs, coeffs, token_coeffs=None):
        from redi_ds import kernels

        if coeffs is not None or token_coeffs is not None:
            return kernels.fused_linear_loss(hidden, self.weight, targets, coeffs, self.bias, seq_ids, num_seqs,
                                             token_coeffs=token_coeffs, options=self.options,
                                             transform=self.transform)
        sums, counts = kernels.fused_sequence_logprobs(hidden, self.weight, targets, self.bias, seq_ids, num_seqs,
                                                       options=self.options, transform=self.transform)
        return None, sums, counts


class PolicyModel(nn.Module):
    """The trained module: HF body + fused head + a sequence loss.

    The body and the head are found generically (``redi_ds.families.body_and_head``: ``get_decoder()``,
    ``get_output_embeddings()``); the head is replaced in place (``set_output_embeddings``) by a FusedHead that
    holds the same Parameters and applies the family's post-head transform. ``forward(batch, totals, ref_logps)``
    -> (this micro batch's share of the step objective, metrics).
    """

    def __init__(self, hf_model, loss_fn, head_options: FusedHeadOptions, sp=None):
        from redi_ds.families import body_and_head, transform_for

        super().__init__()
        self.hf = hf_model
        self.sp = sp  # redi_ds.parallel.SequenceParallel: in training, each rank sees its shard of every row
        _, head = body_and_head(hf_model)
        # Tied head (Qwen2.5-1.5B): the embedding's backward gathers the shared weight anyway, and ZeRO-3
        # accumulates the head's gradient into it then, so the one-pass head can hide from the backward
        # hooks and save a [V, H] gather. An untied head cannot: ZeRO-3 accumulates a gradient into the
        # resident parameter, so its weight must be gathered when its gradient arrives.
        self.tied = head.weight is hf_model.get_input_embeddings().weight
        hf_model.set_output_embeddings(FusedHead(head, head_options, transform_for(hf_model.config)))
        self.loss_fn = loss_fn
        _quiet_deepspeed_about_unhooked()

    @property
    def head(self) -> "FusedHead":
        return self.hf.get_output_embeddings()

    def sequence_logprobs(self, batch: dict, coeffs: Optional[torch.Tensor] = None,
                          token_coeffs: Optional[torch.Tensor] = None):
        """(share or None, sums [S], counts [S]); with ``coeffs`` (per sequence) or ``token_coeffs`` (per
        position) the one-pass linear form."""
        args = (self._hidden(batch), batch["targets"], batch["seq_ids"], batch["num_seqs"], coeffs, token_coeffs)
        if (coeffs is not None or token_coeffs is not None) and self.tied:
            return self.head(Unhooked(args)).value
        return self.head(*args)

    def _hidden(self, batch: dict) -> torch.Tensor:
        out = self.hf.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    position_ids=batch["position_ids"], use_cache=False)
        return out.last_hidden_state  # [R, T, H]

    @torch.no_grad()
    def token_logprobs(self, batch: dict) -> torch.Tensor:
        """log p(target) at every position [R, T] (0 where ignored), no gradient, no logits."""
        return self.head(self._hidden(batch), batch["targets"], view="tokens")

    @torch.no_grad()
    def next_logits(self, input_ids, attention_mask, position_ids, cache):
        """Sampling: (the transformed logits of the last position [R, V], the KV cache)."""
        body = self.hf.get_decoder()
        key = _cache_keyword(body)  # transformers 5.2x renamed past_key_values to cache
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **{key: cache})
        return self.head(out.last_hidden_state[:, -1], view="logits"), getattr(out, key)

    def forward(self, batch: dict, totals: StepTotals, ref_logps: Optional[torch.Tensor] = None):
        """Under sequence parallelism (training only) the shares of an SP group's ranks add up to the micro
        batch's share: a linear loss's partial sums over each rank's tokens, or 1/N of a non-linear one."""
        counts = batch["counts"]  # [S], from the collated targets (whole rows): known before the pass
        sp = self.sp if self.training else None
        if sp is not None:
            batch = sp.shard(batch)
        if self.loss_fn.linear:
            per_token = self.loss_fn.token_coefficients(batch, totals)  # a span of each sequence, or sampled tokens
            if per_token is None:
                coeffs = self.loss_fn.coefficients(self.loss_fn.normaliser(batch), totals)
                share, sums, _ = self.sequence_logprobs(batch, coeffs)
            else:
                share, sums, _ = self.sequence_logprobs(batch, token_coeffs=per_token)
            if sp is not None:
                sums = sp.all_reduce_detached(sums)  # the metrics need whole sequences; the gradient does not
        else:
            _, sums, _ = self.sequence_logprobs(batch)
            if sp is not None:
                sums = sp.all_reduce_sums(sums)
            share = self.loss_fn(sums, counts, totals, ref_logps)
            if sp is not None:
                share = share / sp.size
        return share, self.loss_fn.metrics(sums.detach(), counts, ref_logps)


def _cache_keyword(body) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


class _DropUnhookedWarning:
    """A logging filter: drops DeepSpeed's warning about ``Unhooked`` values (any other type still warns)."""

    marker = "(<class 'redi_ds.model.Unhooked'>)"

    def filter(self, record) -> bool:
        return self.marker not in record.getMessage()


def _quiet_deepspeed_about_unhooked() -> None:
    """DeepSpeed warns once that a module's inputs/outputs are of a type its hooks cannot look into: for
    ``Unhooked`` that is the point. The filter is added to DeepSpeed's logger once per process."""
    import logging

    log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropUnhookedWarning) for f in log.filters):
        log.addFilter(_DropUnhookedWarning())


def export_hf(state_dict: dict, hf_model, tokenizer, out_dir: str) -> None:
    """Write an HF folder (safetensors + config + tokenizer) from a full state dict of PolicyModel."""
    import transformers

    from redi_ds import lora

    sd = {k[len("hf."):]: v.detach().cpu() for k, v in state_dict.items() if k.startswith("hf.")}
    dtype = next(iter(sd.values())).dtype  # export in the training precision (bf16 stays bf16)
    # an attention the family supports everywhere (training may have used flash-attention or Ulysses' core)
    cls = causal_lm_class(hf_model.config)
    fresh = transformers.AutoModelForCausalLM.from_config(
        hf_model.config, attn_implementation=attention_for(cls, "auto", cuda=False)).to(dtype)
    if lora.is_peft(hf_model):  # the adapter to out_dir/adapter, the merged model to out_dir
        fresh, sd = lora.export(fresh, hf_model, sd, out_dir), None
    missing, unexpected = fresh.load_state_dict(sd, strict=False) if sd is not None else ([], [])
    fresh.tie_weights()
    tied = {name for name, p in fresh.named_parameters(remove_duplicate=False)
            if p is fresh.get_input_embeddings().weight}  # a tied head's key is its embedding's
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh.config.use_cache = True
    fresh.generation_config.use_cache = True  # training turned the KV cache off; generation wants it
    fresh.save_pretrained(out_dir, safe_serialization=True)
    from redi_ds.hf_tokenizer import save_tokenizer

    save_tokenizer(tokenizer, out_dir)
