"""Triton row kernel of the fused head + its launcher. Imported only when impl="triton" is used.

Math (one program = one selected token; z = its row of the [C, V] logits block, y = its target):

    pass 1 (skipped when lse is given): online logsumexp over V tiles (flash-attention style rescaling)
        m_k = max(m_{k-1}, max(z_tile));  d_k = d_{k-1} * exp(m_{k-1} - m_k) + sum exp(z_tile - m_k)
        lse = m + log d;  logp = z_y - lse
    pass 2 (if WRITE_GRAD): G = exp(z - lse) - onehot(y), written in place over z in the block's dtype.

A post-head transform (transform.py) is applied to every tile as it is loaded, z' = c tanh(s z / c) (SOFTCAP)
or s z, before the logsumexp and at the target; pass 2 writes G = (exp(z' - lse) - onehot(y)) * dz'/dz with
dz'/dz = s (1 - tanh^2) or s. tanh is 2 sigmoid(2x) - 1 (Triton has no tanh; the interpreter runs it too).

All arithmetic is fp32 in registers whatever the block dtype (bf16 logits from cuBLAS on GPU; fp32 under
TRITON_INTERPRET=1 on CPU: the kernel uses no tl.dot, so the interpreter is exact there). G lies in
[-1, 1], so bf16 storage loses only relative precision. The per-row coefficient is not applied here
(see engine.py): d(loss)/dz = -r * G with r applied to the [C, H] operands of the matmuls.

Memory traffic per row: 2 reads + 1 write of V elements (1 read + 1 write when lse is given).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from redi_ds.kernels.transform import IDENTITY, LogitTransform


@triton.jit
def _transformed(z, scale, cap, SOFTCAP: tl.constexpr):
    """(z', dz'/dz) of fp32 logits: c tanh(s z / c) with s (1 - tanh^2), or s z with s."""
    if SOFTCAP:
        u = 2.0 * tl.sigmoid(2.0 * z * (scale / cap)) - 1.0
        return cap * u, scale * (1.0 - u * u)
    else:
        return z * scale, scale + 0.0 * z


@triton.jit
def _head_rows_kernel(x_ptr, stride_row, targets_ptr, lse_ptr, logp_ptr, V, scale, cap,
                      BLOCK_V: tl.constexpr, HAS_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_row
    y = tl.load(targets_ptr + row)
    if HAS_LSE:
        lse = tl.load(lse_ptr + row).to(tl.float32)
    else:
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z, _ = _transformed(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), scale, cap, SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        zy, _ = _transformed(tl.load(row_ptr + y).to(tl.float32), scale, cap, SOFTCAP)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, zy - lse)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z, dz = _transformed(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), scale, cap, SOFTCAP)
            g = (tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)) * dz
            tl.store(row_ptr + cols, g.to(x_ptr.dtype.element_ty), mask=mask)


def triton_rows(x: Tensor, targets: Tensor, lse: Optional[Tensor] = None, write_grad: bool = True,
                block_v: int = 32768, num_warps: Optional[int] = None, transform: LogitTransform = IDENTITY
                ) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """Launcher; same contract as ``torch_head.torch_rows`` (x [C, V] is overwritten with G)."""
    c, v = x.shape
    if x.stride(1) != 1:
        raise ValueError("triton_rows: the logits block must be row-contiguous")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                           "imported (CPU interpreter, fp32)")
    has_lse = lse is not None
    if has_lse:
        lse = lse.to(torch.float32).contiguous()
        logp = lse  # unused by the kernel
    else:
        lse = torch.empty(c, dtype=torch.float32, device=x.device)
        logp = torch.empty(c, dtype=torch.float32, device=x.device)
    if c == 0:
        return (None if has_lse else logp), lse, x
    block = min(triton.next_power_of_2(v), block_v)
    if num_warps is None:
        num_warps = 32 if block >= 16384 else 16 if block >= 4096 else 4
    cap = transform.softcap
    _head_rows_kernel[(c,)](x, x.stride(0), targets.contiguous(), lse, logp, v, float(transform.scale),
                            float(cap if cap is not None else 1.0), BLOCK_V=block, HAS_LSE=has_lse,
                            WRITE_GRAD=write_grad, SOFTCAP=cap is not None, num_warps=num_warps)
    return (None if has_lse else logp), lse, x


def _interpreter_on() -> bool:
    """The flag @triton.jit reads when it decorates: knobs.runtime.interpret (TRITON_INTERPRET before 3.3)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# read at import, the moment the kernel above was decorated: it runs in the CPU interpreter iff this is set
INTERPRETED = _interpreter_on()
