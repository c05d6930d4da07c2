"""The loss interface and its registry."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

LOSSES: dict[str, type["SequenceLoss"]] = {}


def register_loss(cls: type["SequenceLoss"]) -> type["SequenceLoss"]:
    LOSSES[cls.name] = cls
    return cls


class SequenceLoss(nn.Module):
    name: ClassVar[str]
    paired: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False
    linear: ClassVar[bool] = False

    @classmethod
    def from_config(cls, loss_cfg) -> "SequenceLoss":
        return cls()

    def coefficients(self, counts: Tensor) -> Tensor:
        """Per-sequence c_s with loss == sum_s c_s * logps_s (linear losses only)."""
        raise NotImplementedError(f"{self.name} is not linear in the sequence log-probs")

    def forward(self, logps: Tensor, counts: Tensor, ref_logps: Optional[Tensor] = None) -> tuple[Tensor, dict]:
        raise NotImplementedError

    # -- shared helpers
    @staticmethod
    def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0] // 2
        return x[:b], x[b:]

    def pair_metrics(self, logps: Tensor, counts: Tensor) -> dict[str, Tensor]:
        norm = (logps / counts.clamp(min=1)).detach()
        c, r = self.split_pairs(norm)
        return {
            "logp_chosen": c.mean(),
            "logp_rejected": r.mean(),
            "margin": (c - r).mean(),
            "tokens": counts.sum().to(torch.float32),
        }


def build_loss(loss_cfg) -> SequenceLoss:
    return LOSSES[loss_cfg.name].from_config(loss_cfg)
