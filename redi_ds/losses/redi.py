"""REDI (Xu et al. 2025, arXiv 2505.24850): reference-free, asymmetric, length-normalised.

    L = mean_b [ -lp(y+_b) / |y+_b|  +  alpha * lp(y-_b) / |y-_b| ]

Linear in the sequence log-probs: c = -1/(B |y+|) on a chosen row, +alpha/(B |y-|) on a rejected row.
"""

from __future__ import annotations

from torch import Tensor

from redi_ds.kernels import redi_coefficients
from redi_ds.losses.base import SequenceLoss, register_loss


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

    def coefficients(self, counts: Tensor) -> Tensor:
        return redi_coefficients(counts, self.alpha)

    def forward(self, logps, counts, ref_logps=None):
        n = counts.to(logps.dtype)
        c, r = self.split_pairs(logps / n)
        loss = (-c + self.alpha * r).mean()
        return loss, self.pair_metrics(logps, counts)
