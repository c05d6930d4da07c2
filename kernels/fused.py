"""Public entry points of the fused LM head: autograd Functions and the functionals the trainer calls.

Math (rows = sequences, or ``seq_ids`` per position for a packed row; labels aligned with hidden, -100
ignored; z_t = W h_t + b):

    lp_s = sum_{t in s, y_t != -100} ( z_t[y_t] - logsumexp(z_t) )

fused_linear_loss (SFT, REDI: linear in lp, coefficients known before the pass)
    loss = sum_s c_s lp_s = sum_t c_{s_t} logp_t
    One pass computes loss, lp, and d hidden / d weight / d bias (stashed in ctx); backward only scales
    them by grad_output. REDI: c = -1/(B n_s) on chosen rows, +alpha/(B n_s) on rejected; SFT: -1/sum n.
fused_sequence_logprobs (DPO, SimPO: the loss is a non-linear function of lp)
    forward: lp_s (and lse_t, stored: O(tokens)); backward gets g_s = d L / d lp_s and makes a second
    pass over the vocabulary with r_t = g_{s_t}.
fused_redi_loss: the REDI loss over [2B, T] rows (chosen first) via fused_linear_loss.

The [tokens x vocab] logits are never materialised: see engine.py for the block design and why.
``impl``: "triton" (kernels/triton_head.py), "torch" (kernels/torch_head.py, the CPU path), "auto"
(triton on CUDA, torch elsewhere); "reference" routes to the unfused oracle (config kernel.impl: reference).
Triton is imported only when impl resolves to "triton".
Low-precision (bf16/fp16) inputs: matmuls in the input dtype with fp32 accumulation, softmax in fp32;
log-probs and the loss come back in fp32 and the gradients in the input dtypes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from redi_ds.kernels.engine import Selection, grad_pass, select_tokens, sums_from_tokens, value_pass
from redi_ds.kernels.options import FusedHeadOptions
from redi_ds.kernels.reference import IGNORE_INDEX, redi_from_sums, reference_sequence_logprobs


def _options(impl: str, chunk_size: int, options: Optional[FusedHeadOptions]) -> FusedHeadOptions:
    if options is not None:
        return options
    return FusedHeadOptions(impl=impl, chunk_size=int(chunk_size))


def _needs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[bool, bool, bool]:
    if not torch.is_grad_enabled():
        return False, False, False
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


def _scale(grad: Optional[Tensor], grad_output: Tensor) -> Optional[Tensor]:
    if grad is None:
        return None
    return grad * grad_output.to(grad.dtype)


# ----------------------------------------------------------------------------- single pass (SFT / REDI)
class FusedLinearLossFunction(torch.autograd.Function):
    """loss = sum_t coef[seq_t] logp_t; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, sel: Selection, coeffs, opts: FusedHeadOptions, need):
        coef_tok = coeffs.to(device=hidden.device).index_select(0, sel.seq)
        logp, _, grads = grad_pass(hidden, weight, bias, sel, coef_tok, opts, need)
        loss = (coef_tok.to(logp.dtype) * logp).sum()
        sums = sums_from_tokens(logp, sel)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        gh, gw, gb = ctx.saved_tensors
        if torch.equal(grad_loss, torch.ones_like(grad_loss)):
            return gh, gw, gb, None, None, None, None
        return _scale(gh, grad_loss), _scale(gw, grad_loss), _scale(gb, grad_loss), None, None, None, None


def fused_linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, coeffs: Tensor, bias: Optional[Tensor] = None,
                      seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None, impl: str = "auto",
                      chunk_size: int = 1024, *, options: Optional[FusedHeadOptions] = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """loss = sum_s coeffs[s] * lp_s, with the gradients produced in this same pass.

    Returns (loss, sums [S] detached, counts [S] long). coeffs: [S] (fp32), treated as constants.
    A sequence with no target tokens contributes nothing (lp_s = 0, whatever its coefficient).
    """
    if impl == "reference" and options is None:  # the unfused oracle (kernel.impl: reference)
        sums, counts = reference_sequence_logprobs(hidden, weight, labels, bias, seq_ids, num_seqs)
        return (coeffs.to(sums.device, sums.dtype) * sums).sum(), sums.detach(), counts
    opts = _options(impl, chunk_size, options)
    sel = select_tokens(hidden, weight, labels, seq_ids, num_seqs)
    if coeffs.shape != (sel.num_seqs,):
        raise ValueError(f"coeffs must be [{sel.num_seqs}], got {tuple(coeffs.shape)}")
    need = _needs(hidden, weight, bias)
    if not any(need):
        logp, _ = value_pass(hidden, weight, bias, sel, opts)
        coef_tok = coeffs.to(device=hidden.device, dtype=logp.dtype).index_select(0, sel.seq)
        return (coef_tok * logp).sum(), sums_from_tokens(logp, sel), sel.counts
    loss, sums = FusedLinearLossFunction.apply(hidden, weight, bias, sel, coeffs.detach(), opts, need)
    return loss, sums, sel.counts


# ----------------------------------------------------------------------------- two pass (DPO / SimPO)
class FusedSequenceLogprobsFunction(torch.autograd.Function):
    """sums_s = lp_s; backward: one scalar per sequence, a second pass over the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, sel: Selection, opts: FusedHeadOptions, need):
        logp, lse = value_pass(hidden, weight, bias, sel, opts)
        sums = sums_from_tokens(logp, sel)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.sel, ctx.opts, ctx.need = sel, opts, need
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden, weight, bias, lse = ctx.saved_tensors
        sel: Selection = ctx.sel
        g_tok = grad_sums.to(lse.dtype).index_select(0, sel.seq)
        _, _, grads = grad_pass(hidden, weight, bias, sel, g_tok, ctx.opts, ctx.need, lse=lse)
        return grads.hidden, grads.weight, grads.bias, None, None, None


def fused_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                            seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None,
                            impl: str = "auto", chunk_size: int = 1024, *,
                            options: Optional[FusedHeadOptions] = None) -> tuple[Tensor, Tensor]:
    """Per-sequence (sum of target log-probs [S] with grad, target counts [S] long)."""
    if impl == "reference" and options is None:  # the unfused oracle (kernel.impl: reference)
        return reference_sequence_logprobs(hidden, weight, labels, bias, seq_ids, num_seqs)
    opts = _options(impl, chunk_size, options)
    sel = select_tokens(hidden, weight, labels, seq_ids, num_seqs)
    need = _needs(hidden, weight, bias)
    if not any(need):
        logp, _ = value_pass(hidden, weight, bias, sel, opts)
        return sums_from_tokens(logp, sel), sel.counts
    sums = FusedSequenceLogprobsFunction.apply(hidden, weight, bias, sel, opts, need)
    return sums, sel.counts


# ----------------------------------------------------------------------------- REDI
def redi_coefficients(counts: Tensor, alpha: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """c_s with REDI loss == sum_s c_s lp_s over [2B] rows (chosen first): -1/(B n_s), then +alpha/(B n_s)."""
    b = counts.shape[0] // 2
    n = counts.to(dtype)
    sign = torch.cat([torch.full((b,), -1.0, dtype=dtype), torch.full((b,), float(alpha), dtype=dtype)])
    return sign.to(n.device) / (b * n)


def fused_redi_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, alpha: float, bias: Optional[Tensor] = None,
                    impl: str = "auto", chunk_size: int = 1024, options: Optional[FusedHeadOptions] = None
                    ) -> tuple[Tensor, dict]:
    """REDI over [2B, T] rows (chosen first): mean_b -lp(y+)/|y+| + alpha lp(y-)/|y-|, plus detached metrics."""
    if labels.dim() != 2 or labels.shape[0] % 2 or labels.shape[0] == 0:
        raise ValueError(f"fused_redi_loss: labels must be [2B, T] (chosen rows first), got {tuple(labels.shape)}")
    counts = (labels != IGNORE_INDEX).sum(-1)
    if bool((counts == 0).any()):
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"fused_redi_loss: row(s) {rows} have no target tokens (all labels are -100)")
    coeffs = redi_coefficients(counts, alpha, torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    loss, sums, counts = fused_linear_loss(hidden, weight, labels, coeffs, bias=bias, impl=impl,
                                           chunk_size=chunk_size, options=options)
    _, metrics = redi_from_sums(sums, counts, alpha)
    return loss, metrics
