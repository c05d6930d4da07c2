"""DPO (Rafailov et al. 2023), the paper's baseline; reference log-probs are precomputed once.

    L = mean_b -log sigmoid( beta * [(lp(y+) - ref(y+)) - (lp(y-) - ref(y-))] )
"""

from __future__ import annotations

import torch.nn.functional as F

from redi_ds.losses.base import SequenceLoss, register_loss


@register_loss
class DPOLoss(SequenceLoss):
    name = "dpo"
    needs_reference = True

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = float(beta)

    @classmethod
    def from_config(cls, loss_cfg):
        return cls(beta=loss_cfg.beta)

    def forward(self, logps, counts, ref_logps=None):
        if ref_logps is None:
            raise ValueError("DPO needs reference log-probs (computed before training)")
        ratio = logps - ref_logps.to(logps.dtype)
        c, r = self.split_pairs(ratio)
        logits = self.beta * (c - r)
        loss = -F.logsigmoid(logits).mean()
        metrics = self.pair_metrics(logps, counts)
        metrics["reward_margin"] = (self.beta * (c - r)).detach().mean()
        metrics["reward_accuracy"] = (logits > 0).float().mean().detach()
        return loss, metrics
