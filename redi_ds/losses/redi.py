"""REDI (Xu et al. 2025, arXiv 2505.24850): reference-free, asymmetric, length-normalised.

    L = mean_{pairs b of the step} [ -lp(y+_b) / |y+_b|  +  alpha * lp(y-_b) / |y-_b| ]

Linear in the sequence log-probs: c = -1/(P |y+|) on a chosen row, +alpha/(P |y-|) on a rejected row,
with P the pairs of the whole step. |y| counts the response tokens through the end-of-turn token
(``<|im_end|>`` for Qwen), see ``redi_ds.data.tokenize``.

``negative_span: divergent`` (not the paper's loss; default ``all``): the rejected term covers only the rejected
tokens from the first one that departs from the chosen trace, and divides by that span's length:

    alpha * sum_{t >= d_b} logp(y-_b,t) / (|y-_b| - d_b)        d_b = the prefix y-_b shares with y+_b

so a same-prefix negative does not push down the correct tokens it shares with the positive. It goes through
the fused head as per-token coefficients (``span_mask`` and ``span_counts`` of the collated batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from redi_ds.losses.base import LossConfig, SequenceLoss, StepTotals, finite, register_loss

SPANS = ("all", "divergent")


@dataclass
class REDIConfig(LossConfig):
    name: str = "redi"
    alpha: float = 0.8  # weight of the rejected term, in [0, 1] (the paper: 0.8)
    negative_span: str = "all"  # all (the paper's loss) | divergent (see the module doc)

    def __post_init__(self):
        finite("loss", alpha=self.alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha = {self.alpha}; REDI's alpha lies in [0, 1]")
        if self.negative_span not in SPANS:
            raise ValueError(f"loss.negative_span = {self.negative_span!r}; expected all or divergent")


@register_loss
class REDILoss(SequenceLoss):
    name = "redi"
    Config = REDIConfig
    linear = True

    def __init__(self, alpha: float = 0.8, negative_span: str = "all"):
        super().__init__()
        REDIConfig(alpha=alpha, negative_span=negative_span)  # the same checks as the config
        self.alpha = float(alpha)
        self.divergent = negative_span == "divergent"

    @classmethod
    def from_config(cls, loss_cfg):
        return cls(alpha=loss_cfg.alpha, negative_span=loss_cfg.negative_span)

    def normaliser(self, batch):
        return batch["span_counts"] if self.divergent else batch["counts"]

    def token_mask(self, batch):
        return batch["span_mask"] if self.divergent else None

    def coefficients(self, counts: Tensor, totals: StepTotals) -> Tensor:
        b = counts.shape[0] // 2
        sign = torch.tensor([-1.0] * b + [self.alpha] * b, dtype=torch.float64, device=counts.device)
        return sign / (totals.examples * counts.clamp(min=1).to(torch.float64))

    def metrics(self, logps, counts, ref_logps=None):
        return self.pair_metrics(logps, counts)
