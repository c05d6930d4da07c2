"""REDI (Xu et al. 2025, arXiv 2505.24850): reference-free, asymmetric, length-normalised.

    L = mean_{pairs b of the step} [ -lp(y+_b) / |y+_b|  +  alpha * lp(y-_b) / |y-_b| ]

Linear in the sequence log-probs: c = -1/(P |y+|) on a chosen row, +alpha/(P |y-|) on a rejected row,
with P the pairs of the whole step. |y| counts the response tokens through the end-of-turn token
(``<|im_end|>`` for Qwen), see ``redi_ds.data.tokenize``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from redi_ds.losses.base import SequenceLoss, StepTotals, register_loss


@register_loss
class REDILoss(SequenceLoss):
    name = "redi"
    linear = True

    def __init__(self, alpha: float = 0.8):
        super().__init__()
        self.alpha = float(alpha)

    @classmethod
    def from_config(cls, loss_cfg):
        return cls(alpha=loss_cfg.alpha)

    def coefficients(self, counts: Tensor, totals: StepTotals) -> Tensor:
        b = counts.shape[0] // 2
        sign = torch.tensor([-1.0] * b + [self.alpha] * b, dtype=torch.float32, device=counts.device)
        return sign / (totals.examples * counts.clamp(min=1).to(torch.float32))

    def metrics(self, logps, counts, ref_logps=None):
        return self.pair_metrics(logps, counts)
