"""SFT: token-mean negative log-likelihood over the response tokens of the micro batch.

    L = -sum_s lp_s / sum_s n_s            (linear: c_s = -1 / sum n)
"""

from __future__ import annotations

import torch
from torch import Tensor

from redi_ds.losses.base import SequenceLoss, register_loss


@register_loss
class SFTLoss(SequenceLoss):
    name = "sft"
    paired = False
    linear = True

    def coefficients(self, counts: Tensor) -> Tensor:
        total = counts.sum().to(torch.float32)
        return torch.full(counts.shape, -1.0, dtype=torch.float32, device=counts.device) / total

    def forward(self, logps, counts, ref_logps=None):
        loss = -logps.sum() / counts.sum()
        return loss, {"nll": loss.detach(), "tokens": counts.sum().to(torch.float32)}
