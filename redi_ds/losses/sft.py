"""SFT: the negative log-likelihood of the response tokens, a token mean over the whole optimizer step.

    L = -sum_{s in step} lp_s / N_step            N_step = response tokens of the step, all ranks

(linear: c_s = -1 / N_step). This is what HF Trainer computes with ``num_items_in_batch`` and
``average_tokens_across_devices``: every response token of the step weighs the same, whatever the length of
its trace and however the step is split into micro batches and ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from redi_ds.losses.base import SequenceLoss, StepTotals, register_loss


@register_loss
class SFTLoss(SequenceLoss):
    name = "sft"
    paired = False
    linear = True

    def coefficients(self, counts: Tensor, totals: StepTotals) -> Tensor:
        return torch.full(counts.shape, -1.0 / totals.tokens, dtype=torch.float64, device=counts.device)
