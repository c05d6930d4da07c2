"""SimPO (Meng et al. 2024), the paper's baseline: reference-free, length-normalised, with a margin.

    L = mean_{pairs b of the step} -log sigmoid( beta * lp(y+)/|y+| - beta * lp(y-)/|y-| - gamma )
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from redi_ds.losses.base import LossConfig, SequenceLoss, finite, per_pair, register_loss


@dataclass
class SimPOConfig(LossConfig):
    name: str = "simpo"
    beta: float = 2.0  # > 0: the reward scale
    gamma: float = 1.0  # the target reward margin, subtracted inside the sigmoid

    def __post_init__(self):
        finite("loss", beta=self.beta, gamma=self.gamma)
        if self.beta <= 0:
            raise ValueError(f"loss.beta = {self.beta}; SimPO's beta must be > 0 (<= 0 inverts the preference)")


@register_loss
class SimPOLoss(SequenceLoss):
    name = "simpo"
    Config = SimPOConfig

    def __init__(self, beta: float = 2.0, gamma: float = 1.0):
        super().__init__()
        self.beta, self.gamma = float(beta), float(gamma)

    @classmethod
    def from_config(cls, loss_cfg):
        return cls(beta=loss_cfg.beta, gamma=loss_cfg.gamma)

    def _logits(self, logps, counts):
        c, r = self.split_pairs(logps / counts.to(logps.dtype))
        return self.beta * (c - r) - self.gamma

    def forward(self, logps, counts, totals, ref_logps=None):
        return per_pair(-F.logsigmoid(self._logits(logps, counts)), totals)

    def metrics(self, logps, counts, ref_logps=None):
        logits = self._logits(logps.detach(), counts)
        return {**self.pair_metrics(logps, counts), "reward_accuracy": (logits > 0).float().mean()}
