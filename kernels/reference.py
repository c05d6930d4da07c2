"""The unfused oracle: logits -> log_softmax -> gather -> per-sequence sums.

Materialises the [tokens x vocab] logits; used as the test oracle (in float64) and as the
``kernel.impl: reference`` path of the trainer.

Conventions shared by every implementation in this package:
- ``labels`` are aligned with ``hidden``: position t predicts ``labels[..., t]`` (the caller shifts);
  ``-100`` marks ignored positions.
- Without ``seq_ids`` each row of ``labels`` [S, T] is one sequence. With ``seq_ids`` (same shape as
  ``labels``, or flat), position t belongs to sequence ``seq_ids[t]`` (a packed padding-free row); the
  number of sequences is ``num_seqs`` or ``seq_ids.max() + 1``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

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


def sequence_logprobs_from_logits(logits: Tensor, labels: Tensor, seq_ids: Optional[Tensor] = None,
                                  num_seqs: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """logits [..., V] aligned with labels [...] -> (sum of target log-probs [S], target counts [S])."""
    v = logits.shape[-1]
    flat_logits = logits.reshape(-1, v)
    flat_labels = labels.reshape(-1)
    idx, s = flat_sequence_index(labels, seq_ids, num_seqs)
    mask = flat_labels != IGNORE_INDEX
    logp = torch.log_softmax(flat_logits.float() if flat_logits.dtype in (torch.float16, torch.bfloat16)
                             else flat_logits, dim=-1)
    tok = logp.gather(-1, flat_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    sums = torch.zeros(s, dtype=tok.dtype, device=tok.device).index_add(0, idx, tok)
    counts = torch.zeros(s, dtype=torch.long, device=tok.device).index_add(0, idx, mask.long())
    return sums, counts


def reference_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                                seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None
                                ) -> tuple[Tensor, Tensor]:
    """hidden [..., H] @ weight[V, H]^T (+ bias) -> per-sequence (log-prob sums, counts), via full logits."""
    logits = F.linear(hidden, weight, bias)
    return sequence_logprobs_from_logits(logits, labels, seq_ids, num_seqs)


def reference_redi_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, alpha: float,
                        bias: Optional[Tensor] = None) -> tuple[Tensor, dict]:
    """The REDI loss over [2B, T] rows (chosen first), computed from full logits."""
    sums, counts = reference_sequence_logprobs(hidden, weight, labels, bias)
    return redi_from_sums(sums, counts, alpha)


def redi_from_sums(sums: Tensor, counts: Tensor, alpha: float) -> tuple[Tensor, dict]:
    b = sums.shape[0] // 2
    norm = sums / counts.to(sums.dtype)
    loss = (-norm[:b] + alpha * norm[b:]).mean()
    metrics = {
        "logp_chosen": sums[:b].detach(), "logp_rejected": sums[b:].detach(),
        "logp_chosen_norm": norm[:b].detach(), "logp_rejected_norm": norm[b:].detach(),
        "count_chosen": counts[:b], "count_rejected": counts[b:],
    }
    return loss, metrics
