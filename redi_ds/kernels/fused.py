"""Public entry points of the fused LM head: autograd Functions and the functionals the trainer calls.

Math (rows = sequences, or ``seq_ids`` per position for a packed row; labels aligned with hidden, -100
ignored; z_t = t(W h_t + b), t the model's post-head transform, identity by default: transform.py):

    logp_t = z_t[y_t] - logsumexp(z_t)          lp_s = sum_{t in s, y_t != -100} logp_t

fused_linear_loss (losses linear in the token log-probs, with coefficients known before the pass)
    loss = sum_t c_t logp_t, with c_t = coeffs[s_t] (one per sequence) or token_coeffs[t] (one per position).
    One pass computes loss, lp, and d hidden / d weight / d bias (stashed in ctx); backward only scales
    them, in place, by grad_output. Under fp16 it takes the two-pass form instead: DeepSpeed's loss scale
    only arrives in backward, and gradients formed in forward without it flush to zero in fp16.
fused_sequence_logprobs (losses that are a non-linear function of lp)
    forward: lp_s (and lse_t, stored: O(tokens)); backward gets g_t = d L / d logp_t (one scalar per
    sequence, broadcast to its tokens) and makes a second pass over the vocabulary.

The kernels know no loss by name: the loss modules (redi_ds.losses) own the formulas and give the
coefficients. The [tokens x vocab] logits are never materialised: see engine.py for the block design.
``impl`` (or ``options.impl``): "triton" (triton_head.py), "torch" (torch_head.py, the CPU
path), "auto" (triton on CUDA, torch elsewhere), "reference" (the unfused oracle, reference.py).
Triton is imported only when impl resolves to "triton".
Low-precision (bf16/fp16) inputs: matmuls in the input dtype with fp32 accumulation, softmax in fp32;
log-probs and the loss come back in fp32 and the gradients in the input dtypes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from redi_ds.kernels.engine import HeadSpec, Selection, grad_pass, select_tokens, sums_from_tokens, value_pass
from redi_ds.kernels.options import FusedHeadOptions, resolve_impl
from redi_ds.kernels.reference import reference_token_logprobs
from redi_ds.kernels.transform import IDENTITY, LogitTransform

DEFAULT_OPTIONS = FusedHeadOptions()


def _spec(impl: Optional[str], options: Optional[FusedHeadOptions], transform: Optional[LogitTransform]
          ) -> HeadSpec:
    opts = options if options is not None else DEFAULT_OPTIONS
    return HeadSpec(opts if impl is None else opts.with_(impl=impl), transform or IDENTITY)


def _needs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[bool, bool, bool]:
    if not torch.is_grad_enabled():
        return False, False, False
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


def _scale_(grad: Optional[Tensor], factor: float) -> Optional[Tensor]:
    """grad *= factor, in place: the saved gradient is the only [V, H] buffer at the peak of backward."""
    if grad is not None and factor != 1.0:
        grad.mul_(factor)
    return grad


# ----------------------------------------------------------------------------- single pass (linear losses)
class FusedLinearLossFunction(torch.autograd.Function):
    """loss = sum_t coef_tok[t] logp_t; gradients computed in forward, scaled in place in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, sel: Selection, coef_tok, spec: HeadSpec, need):
        logp, _, grads = grad_pass(hidden, weight, bias, sel, coef_tok, spec, need)
        loss = (coef_tok.to(logp.dtype) * logp).sum()
        sums = sums_from_tokens(logp, sel)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        gh, gw, gb = ctx.saved_tensors
        factor = float(grad_loss)  # DeepSpeed passes 1/accum (or the loss scale): one host sync per micro step
        return _scale_(gh, factor), _scale_(gw, factor), _scale_(gb, factor), None, None, None, None


# ----------------------------------------------------------------------------- two pass (any loss)
class FusedTokenLogprobsFunction(torch.autograd.Function):
    """logp_t of the selected tokens [n]; backward: one scalar per token, a second pass over the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, sel: Selection, spec: HeadSpec, need):
        logp, lse = value_pass(hidden, weight, bias, sel, spec)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.sel, ctx.spec, ctx.need = sel, spec, need
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, lse = ctx.saved_tensors
        _, _, grads = grad_pass(hidden, weight, bias, ctx.sel, grad_logp.to(lse.dtype), ctx.spec, ctx.need, lse=lse)
        return grads.hidden, grads.weight, grads.bias, None, None, None


def _token_logprobs(hidden, weight, bias, sel: Selection, spec: HeadSpec) -> Tensor:
    """logp [n] of the selected tokens, differentiable (two-pass) when a gradient is needed."""
    need = _needs(hidden, weight, bias)
    if not any(need):
        return value_pass(hidden, weight, bias, sel, spec)[0]
    return FusedTokenLogprobsFunction.apply(hidden, weight, bias, sel, spec, need)


def _reference_token_logprobs(hidden, weight, bias, labels, sel: Selection, spec: HeadSpec) -> Tensor:
    """The oracle's logp [n] of the selected tokens (via full logits)."""
    return reference_token_logprobs(hidden, weight, labels, bias, spec.transform).index_select(0, sel.index)


def _coef_tok(sel: Selection, labels: Tensor, coeffs: Optional[Tensor], token_coeffs: Optional[Tensor],
              device) -> Tensor:
    if (coeffs is None) == (token_coeffs is None):
        raise ValueError("give exactly one of coeffs (one per sequence) and token_coeffs (one per position)")
    if coeffs is not None:
        if coeffs.shape != (sel.num_seqs,):
            raise ValueError(f"coeffs must be [{sel.num_seqs}] (one per sequence), got {tuple(coeffs.shape)}")
        return coeffs.detach().to(device).index_select(0, sel.seq)
    if token_coeffs.shape != labels.shape:
        raise ValueError(f"token_coeffs must have the labels' shape {tuple(labels.shape)}, "
                         f"got {tuple(token_coeffs.shape)}")
    return token_coeffs.detach().to(device).reshape(-1).index_select(0, sel.index)


def fused_linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, coeffs: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None, seq_ids: Optional[Tensor] = None,
                      num_seqs: Optional[int] = None, *, token_coeffs: Optional[Tensor] = None,
                      impl: Optional[str] = None, options: Optional[FusedHeadOptions] = None,
                      transform: Optional[LogitTransform] = None) -> tuple[Tensor, Tensor, Tensor]:
    """loss = sum_t c_t logp_t (c: ``coeffs`` [S] per sequence or ``token_coeffs`` per position), with the
    gradients produced in this same pass (bf16/fp32; fp16 takes the two-pass form, see the module doc).

    Returns (loss, sums [S] detached, counts [S] long). The coefficients are treated as constants.
    A sequence with no target tokens contributes nothing (lp_s = 0, whatever its coefficient).
    ``transform``: the model's post-head transform (a scale, a softcap), exact in value and gradient.
    """
    spec = _spec(impl, options, transform)
    sel = select_tokens(hidden, weight, labels, seq_ids, num_seqs)
    coef_tok = _coef_tok(sel, labels, coeffs, token_coeffs, hidden.device)
    need = _needs(hidden, weight, bias)
    impl_ = resolve_impl(spec.options.impl, hidden.is_cuda)
    if impl_ == "reference" or (any(need) and weight.dtype == torch.float16):
        logp = (_reference_token_logprobs(hidden, weight, bias, labels, sel, spec) if impl_ == "reference"
                else _token_logprobs(hidden, weight, bias, sel, spec))
        loss = (coef_tok.to(logp.dtype) * logp).sum()
        return loss, sums_from_tokens(logp.detach(), sel), sel.counts
    if not any(need):
        logp, _ = value_pass(hidden, weight, bias, sel, spec)
        return (coef_tok.to(logp.dtype) * logp).sum(), sums_from_tokens(logp, sel), sel.counts
    loss, sums = FusedLinearLossFunction.apply(hidden, weight, bias, sel, coef_tok, spec, need)
    return loss, sums, sel.counts


def fused_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                            seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None, *,
                            impl: Optional[str] = None, options: Optional[FusedHeadOptions] = None,
                            transform: Optional[LogitTransform] = None) -> tuple[Tensor, Tensor]:
    """Per-sequence (sum of target log-probs [S], differentiable; target counts [S] long)."""
    spec = _spec(impl, options, transform)
    sel = select_tokens(hidden, weight, labels, seq_ids, num_seqs)
    if resolve_impl(spec.options.impl, hidden.is_cuda) == "reference":
        logp = _reference_token_logprobs(hidden, weight, bias, labels, sel, spec)
    else:
        logp = _token_logprobs(hidden, weight, bias, sel, spec)
    sums = torch.zeros(sel.num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, sel.seq, logp)
    return sums, sel.counts


@torch.no_grad()
def fused_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, *,
                         impl: Optional[str] = None, options: Optional[FusedHeadOptions] = None,
                         transform: Optional[LogitTransform] = None) -> Tensor:
    """The per-token view, no gradient: logp_t of every target, laid out like ``labels`` (0 where ignored). What a
    teacher scores each sampled token with, without [tokens x vocab] logits."""
    spec = _spec(impl, options, transform)
    sel = select_tokens(hidden, weight, labels.reshape(1, -1) if labels.dim() == 1 else labels, None, None)
    if resolve_impl(spec.options.impl, hidden.is_cuda) == "reference":
        logp = _reference_token_logprobs(hidden, weight, bias, labels, sel, spec)
    else:
        logp = value_pass(hidden, weight, bias, sel, spec)[0]
    out = torch.zeros(labels.numel(), dtype=logp.dtype, device=logp.device)
    out[sel.index] = logp
    return out.view(labels.shape)
