"""The block loop shared by both impls: token selection, chunked matmuls, gradient accumulation.

Design (why this one). Per selected token t (target y_t, sequence s_t, coefficient r_t = d loss / d logp_t):

    z_t   = W h_t (+ b)                         logits, V = 151,936 for Qwen
    logp_t = z_t[y_t] - logsumexp(z_t)          sums_s = sum_{t in s} logp_t
    d loss / d z_t = -r_t * G_t,  G_t = softmax(z_t) - onehot(y_t)   (times dz'/dz under a post-head
                                                                    transform z' = t(z): transform.py)
    d h_t = -r_t * (G_t W)                      [C, V] x [V, H]
    d W   = sum_t G_t^T (-r_t h_t)              [V, C] x [C, H]  (r folded into the small operand)
    d b   = sum_t -r_t G_t

REDI and SFT are linear in the log-probs (loss = sum_s c_s sums_s), so r_t = c_{s_t} is known before the
pass and the gradients come out of the same pass ("single-pass", design (a) of the issue): per block of
C selected tokens, one [C, V] buffer holds the logits, the row op (Triton kernel or its torch twin) turns
it in place into G, and three matmuls (z, dH, dW: the 6 N H V floor) run on cuBLAS / MKL. Memory is the
one [C, V] buffer (bf16 on the triton path: 311 MB at C=1024) plus the gradients themselves.

Why not design (b) (logits never leave the chip, CCE style)? It needs four products (8 N H V: pass two
recomputes the logits for dW) written as Triton tl.dot GEMMs, which rarely reach cuBLAS's rate at
H=1536; (a) with cuBLAS runs at the matmul rate plus ~3 bytes/logit of row-kernel traffic (~10% at
H=1536 on an H100), and its memory is a fixed 311 MB, ~1% of the naive path at 16k tokens. The two-pass
form for DPO/SimPO (r_t only known in backward) is (a) with the logits recomputed once more in backward:
forward = 1 product + stored lse [n], backward = 3 products.

Prompt / padding positions (label -100) are dropped before any matmul: they cost nothing.
Blocks gather their hidden rows (index_select) so no [n, H] copy of the selected hidden is kept, and
every block of a pass reuses one preallocated [chunk, V] buffer (on CPU a fresh 600 MB buffer per block
would cost ~150k page faults each time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from redi_ds.kernels.options import FusedHeadOptions, resolve_impl
from redi_ds.kernels.reference import IGNORE_INDEX, flat_sequence_index
from redi_ds.kernels.transform import IDENTITY, LogitTransform

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class HeadSpec:
    """How the head runs (options) and what it computes after the matmul (the model's post-head transform)."""

    options: FusedHeadOptions
    transform: LogitTransform = IDENTITY


@dataclass
class Selection:
    """The non-ignored positions of a batch, flat."""

    index: Tensor    # [n] long: flat positions into hidden.reshape(-1, H)
    targets: Tensor  # [n] long
    seq: Tensor      # [n] long: sequence of each token
    counts: Tensor   # [S] long
    num_seqs: int
    num_positions: int


def select_tokens(hidden: Tensor, weight: Tensor, labels: Tensor, seq_ids: Optional[Tensor],
                  num_seqs: Optional[int]) -> Selection:
    h = hidden.shape[-1]
    m = hidden.numel() // h if h else 0
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, {h}], got {tuple(weight.shape)}")
    if labels.numel() != m:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if seq_ids is not None and seq_ids.numel() != m:
        raise ValueError(f"seq_ids {tuple(seq_ids.shape)} do not match labels {tuple(labels.shape)}")
    if seq_ids is None and labels.dim() < 2:
        raise ValueError("labels must be [S, T] (one row per sequence) unless seq_ids is given")
    seq_all, s = flat_sequence_index(labels, seq_ids, num_seqs)
    flat = labels.reshape(-1)
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    targets = flat.index_select(0, index).long()
    seq = seq_all.index_select(0, index)
    if targets.numel():
        lo, hi = torch.aminmax(targets)
        if int(lo) < 0 or int(hi) >= weight.shape[0]:
            raise ValueError(f"labels must be -100 or in [0, {weight.shape[0]}), got [{int(lo)}, {int(hi)}]")
        slo, shi = torch.aminmax(seq)
        if int(slo) < 0 or int(shi) >= s:
            raise ValueError(f"seq_ids must be in [0, {s}), got [{int(slo)}, {int(shi)}]")
    counts = torch.bincount(seq, minlength=s) if s else torch.zeros(0, dtype=torch.long, device=labels.device)
    return Selection(index, targets, seq, counts, s, m)


def compute_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def row_op(spec: HeadSpec, is_cuda: bool) -> tuple[str, Callable]:
    """The row operation of the resolved impl, with the post-head transform (imports triton only for 'triton')."""
    opts, transform = spec.options, spec.transform
    impl = resolve_impl(opts.impl, is_cuda)
    if impl == "triton":
        from redi_ds.kernels.triton_head import triton_rows

        def op(x, targets, lse=None, write_grad=True):
            return triton_rows(x, targets, lse, write_grad, block_v=opts.block_v, num_warps=opts.num_warps,
                               transform=transform)
        return impl, op
    from redi_ds.kernels.torch_head import torch_rows

    def twin(x, targets, lse=None, write_grad=True):
        return torch_rows(x, targets, lse, write_grad, transform=transform)
    return impl, twin


def _block_buffer(n: int, chunk: int, weight: Tensor) -> Optional[Tensor]:
    """The one [chunk, V] logits buffer, reused by every block of a pass (no page faults / allocator churn)."""
    if n == 0:
        return None
    return torch.empty(min(n, chunk), weight.shape[0], dtype=weight.dtype, device=weight.device)


def _block_logits(impl: str, h_c: Tensor, weight: Tensor, bias: Optional[Tensor], cdt: torch.dtype,
                  buf: Tensor) -> Tensor:
    """[C, V] logits of one block (written into buf's leading rows), in the dtype the row op wants."""
    out = buf[: h_c.shape[0]]
    if bias is None:
        z = torch.mm(h_c, weight.t(), out=out)
    else:
        z = torch.addmm(bias.to(weight.dtype), h_c, weight.t(), out=out)
    if impl == "torch" and z.dtype != cdt:
        z = z.to(cdt)  # the twin works in fp32 (the Triton kernel reads bf16 and computes in fp32 registers)
    return z


def value_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], sel: Selection,
               spec: HeadSpec) -> tuple[Tensor, Tensor]:
    """Forward only: (logp [n], lse [n]) in the compute dtype (fp32 on the triton path)."""
    impl, op = row_op(spec, hidden.is_cuda)
    cdt = compute_dtype(hidden)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = sel.index.numel()
    logp = torch.empty(n, dtype=cdt, device=hidden.device)
    lse = torch.empty(n, dtype=cdt, device=hidden.device)
    chunk = spec.options.chunk_for(weight.shape[0], weight.dtype, weight.device)
    buf = _block_buffer(n, chunk, weight)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        h_c = h2.index_select(0, sel.index[c0:c1]).to(weight.dtype)
        z = _block_logits(impl, h_c, weight, bias, cdt, buf)
        lp, ls, _ = op(z, sel.targets[c0:c1], None, False)
        logp[c0:c1] = lp
        lse[c0:c1] = ls
        del z
    return logp, lse


@dataclass
class Grads:
    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


def grad_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], sel: Selection, coef_tok: Tensor,
              spec: HeadSpec, need: tuple[bool, bool, bool], lse: Optional[Tensor] = None
              ) -> tuple[Optional[Tensor], Optional[Tensor], Grads]:
    """Gradients of sum_t coef_tok[t] * logp_t for hidden, weight, bias (those flagged in need).

    lse None: single pass, also returns (logp [n], lse [n]). lse given: second pass of the two-pass path
    (logp not recomputed, returns (None, lse)).
    """
    impl, op = row_op(spec, hidden.is_cuda)
    opts = spec.options
    cdt = compute_dtype(hidden)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    n = sel.index.numel()
    mdt = weight.dtype  # matmul dtype
    dev = hidden.device
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None

    logp = torch.empty(n, dtype=cdt, device=dev) if lse is None else None
    lse_out = torch.empty(n, dtype=cdt, device=dev) if lse is None else lse
    gh = torch.zeros_like(h2) if need_h else None
    acc_fp32 = need_w and mdt in LOW_PRECISION and opts.fp32_weight_grad
    gw = None
    if need_w:
        gw = torch.zeros(weight.shape, dtype=torch.float32 if acc_fp32 else mdt, device=dev)
    gb = torch.zeros(weight.shape[0], dtype=cdt, device=dev) if need_b else None
    r_all = -coef_tok.to(cdt)  # d loss / d z = r * G
    chunk = opts.chunk_for(weight.shape[0], weight.dtype, weight.device)
    buf = _block_buffer(n, chunk, weight)

    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        idx = sel.index[c0:c1]
        h_c = h2.index_select(0, idx).to(mdt)
        z = _block_logits(impl, h_c, weight, bias, cdt, buf)
        lp, ls, g = op(z, sel.targets[c0:c1], None if lse is None else lse[c0:c1], True)
        if lse is None:
            logp[c0:c1] = lp
            lse_out[c0:c1] = ls
        del z
        if g.dtype != mdt:
            g = g.to(mdt)  # torch twin on bf16: fp32 G -> bf16 for the matmuls
        r = r_all[c0:c1].unsqueeze(1)
        if need_h:
            dh = torch.mm(g, weight)
            gh.index_copy_(0, idx, (dh.to(cdt) * r).to(gh.dtype))
            del dh
        if need_w:
            hs = (h_c.to(cdt) * r).to(mdt)
            if acc_fp32:
                gw.add_(torch.mm(g.t(), hs).float())
            else:
                gw.addmm_(g.t(), hs)
        if need_b:
            gb.add_(torch.mv(g.t(), r.squeeze(1).to(mdt)).to(cdt))
        del g
    grads = Grads(
        gh.view_as(hidden) if gh is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
        gb.to(bias.dtype) if gb is not None else None,
    )
    return logp, lse_out, grads


def sums_from_tokens(values: Tensor, sel: Selection) -> Tensor:
    return torch.zeros(sel.num_seqs, dtype=values.dtype, device=values.device).index_add_(0, sel.seq, values)
