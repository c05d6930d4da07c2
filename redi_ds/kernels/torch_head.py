"""The block row operation in PyTorch: the twin of ``triton_head._head_rows_kernel`` (the CPU path).

Math (one row = one selected token with logits z in R^V and target y):

    lse      = log sum_v exp(z_v)              (max-shifted: m = max z, lse = m + log sum exp(z - m))
    logp     = z_y - lse
    G        = softmax(z) - onehot(y)          (= d(-logp)/dz, the cross-entropy gradient, in [-1, 1])

With a post-head transform z' = t(z) (``transform.py``: a scale, and a softcap c tanh(s z / c)) the row op
works on z': lse and logp are of z', and G = (softmax(z') - onehot(y)) * dz'/dz, so the matmuls are unchanged.
A softcap needs one extra [C, V] buffer here (tanh and the softmax are both alive); a scale needs none.

The caller owns the per-row coefficient r: d(loss)/dz = -r * G. Keeping G unscaled keeps it well inside
the bf16/fp16 range whatever the coefficient (REDI coefficients are ~1e-4); r is applied to the [C, H]
operands of the matmuls instead (see ``engine.py``).

Everything is in place on the [C, V] block: amax, sub_, exp_, sum, div_, one scatter. No [C, V] temporary
beyond the block itself. The block must be in the compute dtype (fp32, or fp64 for the test oracle).
When ``lse`` is given (second pass of the two-pass path) only G is written: exp_(z - lse) - onehot.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from redi_ds.kernels.transform import IDENTITY, LogitTransform


def _transform_(x: Tensor, transform: LogitTransform, need_deriv: bool) -> Optional[Tensor]:
    """x <- t(x) in place; returns dt/dz [C, V] for a softcap (when a gradient is wanted), else None."""
    if transform.softcap is not None:
        c = transform.softcap
        x.mul_(transform.scale / c).tanh_()                                 # u = tanh(s z / c)
        deriv = torch.square(x).neg_().add_(1.0).mul_(transform.scale) if need_deriv else None  # s (1 - u^2)
        x.mul_(c)                                                            # z' = c u
        return deriv
    if transform.scale != 1.0:
        x.mul_(transform.scale)
    return None


def torch_rows(x: Tensor, targets: Tensor, lse: Optional[Tensor] = None, write_grad: bool = True,
               transform: LogitTransform = IDENTITY) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """x [C, V] logits (compute dtype, overwritten) -> (logp [C] or None, lse [C], G in x).

    With lse=None: returns logp and lse; if write_grad, x holds G afterwards (else x is garbage).
    With lse given: x holds G afterwards; logp is None.
    """
    t = targets.unsqueeze(1)
    deriv = _transform_(x, transform, write_grad or lse is not None)
    if lse is None:
        zy = x.gather(1, t).squeeze(1)
        m = x.amax(dim=1)
        x.sub_(m.unsqueeze(1)).exp_()
        s = x.sum(dim=1)
        lse = m + s.log()
        logp = zy - lse
        if write_grad:
            x.div_(s.unsqueeze(1))
    else:
        logp = None
        x.sub_(lse.to(x.dtype).unsqueeze(1)).exp_()
    if write_grad or logp is None:
        x.scatter_add_(1, t, torch.full_like(t, -1, dtype=x.dtype))
        if deriv is not None:
            x.mul_(deriv)
        elif transform.scale != 1.0:
            x.mul_(transform.scale)
    return logp, lse, x
