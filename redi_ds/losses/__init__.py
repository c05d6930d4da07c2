"""Sequence-level losses: small modules over per-sequence log-prob sums and token counts.

Every loss sees ``logps`` [S] (summed token log-probs per sequence) and ``counts`` [S] (response tokens
per sequence); paired losses get S = 2B with the B chosen rows first, then the B rejected rows of the same
pairs. None of them sees logits. Each class declares:

- ``paired``: trains on (prompt, chosen, rejected) pairs rather than SFT rows;
- ``needs_reference``: needs reference-model log-probs (precomputed once before training);
- ``linear``: the loss is ``sum_s c_s * logps_s`` with coefficients known before the pass
  (``coefficients(counts)``), so the fused kernel can produce loss and gradients in one pass.

Found by name through ``LOSSES`` (``build_loss(cfg.loss)``), never through an if/elif chain.
"""

from redi_ds.losses.base import LOSSES, SequenceLoss, build_loss, register_loss
from redi_ds.losses.dpo import DPOLoss
from redi_ds.losses.redi import REDILoss
from redi_ds.losses.sft import SFTLoss
from redi_ds.losses.simpo import SimPOLoss

__all__ = ["LOSSES", "SequenceLoss", "build_loss", "register_loss", "SFTLoss", "REDILoss", "DPOLoss", "SimPOLoss"]
