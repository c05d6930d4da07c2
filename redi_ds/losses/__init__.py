"""Sequence-level losses: small modules over per-sequence log-prob sums and token counts.

Each owns its formula, the chosen/rejected layout it reads, its metrics and, when it is linear in the
log-probs, the per-sequence coefficients the fused head uses. None of them sees logits. See ``base``.
"""

from redi_ds.losses.base import (
    LOSSES,
    LossConfig,
    SequenceLoss,
    StepTotals,
    build_loss,
    loss_config,
    loss_tags,
    register_loss,
)
from redi_ds.losses.distill import DistillLoss
from redi_ds.losses.dpo import DPOLoss
from redi_ds.losses.redi import REDILoss
from redi_ds.losses.sft import SFTLoss
from redi_ds.losses.simpo import SimPOLoss

__all__ = ["LOSSES", "LossConfig", "SequenceLoss", "StepTotals", "build_loss", "loss_config", "loss_tags",
           "register_loss", "SFTLoss", "REDILoss", "DPOLoss", "SimPOLoss", "DistillLoss"]
