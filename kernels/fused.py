"""Public entry points of the fused head (placeholder: the reference path until the kernels land)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from redi_ds.kernels.reference import redi_from_sums, reference_sequence_logprobs


def fused_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                            seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None,
                            impl: str = "auto", chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    return reference_sequence_logprobs(hidden, weight, labels, bias, seq_ids, num_seqs)


def fused_linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, coeffs: Tensor, bias: Optional[Tensor] = None,
                      seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None, impl: str = "auto",
                      chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    sums, counts = reference_sequence_logprobs(hidden, weight, labels, bias, seq_ids, num_seqs)
    loss = (coeffs.to(sums.dtype) * sums).sum()
    return loss, sums.detach(), counts


def fused_redi_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, alpha: float, bias: Optional[Tensor] = None,
                    impl: str = "auto") -> tuple[Tensor, dict]:
    sums, counts = reference_sequence_logprobs(hidden, weight, labels, bias)
    if bool((counts == 0).any()):
        raise ValueError("fused_redi_loss: a row has no target tokens")
    return redi_from_sums(sums, counts, alpha)


_ = torch
