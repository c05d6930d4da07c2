"""DPO (Rafailov et al. 2023), the paper's baseline; reference log-probs are precomputed once.

    L = mean_{pairs b of the step} -log sigmoid( beta * [(lp(y+) - ref(y+)) - (lp(y-) - ref(y-))] )
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from redi_ds.losses.base import LossConfig, SequenceLoss, finite, per_pair, register_loss


@dataclass
class DPOConfig(LossConfig):
    name: str = "dpo"
    beta: float = 0.1  # > 0: the strength of the implicit KL to the reference (<= 0 inverts the preference)

    def __post_init__(self):
        finite("loss", beta=self.beta)
        if self.beta <= 0:
            raise ValueError(f"loss.beta = {self.beta}; DPO's beta must be > 0 (<= 0 inverts the preference)")


@register_loss
class DPOLoss(SequenceLoss):
    name = "dpo"
    Config = DPOConfig
    needs_reference = True

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = float(beta)

    @classmethod
    def from_config(cls, loss_cfg):
        return cls(beta=loss_cfg.beta)

    def _logits(self, logps, ref_logps):
        if ref_logps is None:
            raise ValueError("DPO needs reference log-probs (computed before training)")
        c, r = self.split_pairs(logps - ref_logps.to(logps.dtype))
        return self.beta * (c - r)

    def forward(self, logps, counts, totals, ref_logps=None):
        return per_pair(-F.logsigmoid(self._logits(logps, ref_logps)), totals)

    def metrics(self, logps, counts, ref_logps=None):
        logits = self._logits(logps.detach(), ref_logps)
        return {**self.pair_metrics(logps, counts), "reward_margin": logits.mean(),
                "reward_accuracy": (logits > 0).float().mean()}
