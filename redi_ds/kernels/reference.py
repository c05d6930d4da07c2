"""The unfused oracle: logits -> log_softmax -> gather -> per-sequence sums.

Materialises the [tokens x vocab] logits; used as the test oracle (in float64) and as the
``impl="reference"`` path (config ``kernel.impl: reference``).

Conventions shared by every implementation in this package:
- ``labels`` are aligned with ``hidden``: position t predicts ``labels[..., t]`` (the caller shifts);
  ``-100`` marks ignored positions.
- Without ``seq_ids`` each row of ``labels`` [S, T] is one sequence. With ``seq_ids`` (same shape as
  ``labels``, or flat), position t belongs to sequence ``seq_ids[t]`` (a packed padding-free row); the
  number of sequences is ``num_seqs`` or ``seq_ids.max() + 1``.
- The kernels know no loss by name: they return per-sequence log-prob sums and target counts, and, for a
  loss that is linear in the token log-probs, ``sum_t c_t logp_t`` for coefficients given by the caller.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from redi_ds.kernels.transform import IDENTITY, LogitTransform

IGNORE_INDEX = -100


def flat_sequence_index(labels: Tensor, seq_ids: Optional[Tensor], num_seqs: Optional[int]) -> tuple[Tensor, int]:
    """Per-position sequence index (flat, int64) and the number of sequences."""
    if seq_ids is None:
        s, t = labels.shape[0], labels.shape[-1]
        idx = torch.arange(s, device=labels.device).repeat_interleave(t)
        return idx, s
    idx = seq_ids.reshape(-1).to(torch.long)
    if num_seqs is None:
        num_seqs = int(idx.max().item()) + 1 if idx.numel() else 0
    return idx, num_seqs


def token_logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """logits [..., V] aligned with labels [...] -> log p(label) per position (0 where ignored), flat [N].

    bf16/fp16 logits are upcast to fp32 for the softmax; fp32/fp64 stay as they are.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()
    flat_labels = labels.reshape(-1)
    mask = flat_labels != IGNORE_INDEX
    logp = torch.log_softmax(flat_logits, dim=-1)
    return logp.gather(-1, flat_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask


def sequence_logprobs_from_logits(logits: Tensor, labels: Tensor, seq_ids: Optional[Tensor] = None,
                                  num_seqs: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """logits [..., V] aligned with labels [...] -> (sum of target log-probs [S], target counts [S])."""
    tok = token_logprobs_from_logits(logits, labels)
    idx, s = flat_sequence_index(labels, seq_ids, num_seqs)
    mask = labels.reshape(-1) != IGNORE_INDEX
    sums = torch.zeros(s, dtype=tok.dtype, device=tok.device).index_add(0, idx, tok)
    counts = torch.zeros(s, dtype=torch.long, device=tok.device).index_add(0, idx, mask.long())
    return sums, counts


def reference_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                             transform: LogitTransform = IDENTITY) -> Tensor:
    """t(hidden [..., H] @ weight[V, H]^T (+ bias)) -> log p(label) per position, flat [N] (0 where ignored)."""
    return token_logprobs_from_logits(transform.apply(F.linear(hidden, weight, bias)), labels)


def reference_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                                seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None,
                                transform: LogitTransform = IDENTITY) -> tuple[Tensor, Tensor]:
    """t(hidden [..., H] @ weight[V, H]^T (+ bias)) -> per-sequence (log-prob sums, counts), via full logits."""
    return sequence_logprobs_from_logits(transform.apply(F.linear(hidden, weight, bias)), labels, seq_ids, num_seqs)
