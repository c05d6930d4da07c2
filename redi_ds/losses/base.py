"""The loss interface, its registry, and what a loss normalises by.

A loss sees one micro batch: ``logps`` [S] (summed token log-probs per sequence), ``counts`` [S] (response
tokens per sequence) and the :class:`StepTotals` of the whole optimizer step. It returns the micro batch's
*share* of the step objective: the shares of every micro batch on every rank add up to the objective, so
the objective does not depend on how the step is split into micro batches and ranks (1 rank x micro 8 and
2 ranks x micro 1 x 4 accumulation give the same loss and gradient). The trainer undoes DeepSpeed's
1/accum and rank mean (see ``redi_ds.trainer``).

Paired losses get S = 2B with the B chosen rows first, then the B rejected rows of the same pairs
(``split_pairs``). Each class declares:

- ``paired``: trains on (prompt, chosen, rejected) pairs rather than SFT rows;
- ``needs_reference``: needs reference-model log-probs (precomputed once before training);
- ``linear``: the share is ``sum_s c_s * logps_s`` with ``c = coefficients(counts, totals)`` known before
  the pass, so the fused head produces the loss and its gradients in one pass. A linear loss writes its
  formula once, in ``coefficients``; ``forward`` is derived from it.

Each loss owns its section of the config: ``Config``, a dataclass of ``name`` and the loss's own options, which
checks its values (a one-line ValueError), is what the ``loss`` section of a YAML file becomes, and gives the
run's MLflow tags. A new loss touches neither ``redi_ds.config`` nor ``redi_ds.tracking``.

Found by name through ``LOSSES`` (``build_loss(cfg.loss)``), never through an if/elif chain.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from redi_ds.data.layout import RowLayout, layout_for

LOSSES: dict[str, type["SequenceLoss"]] = {}


def register_loss(cls: type["SequenceLoss"]) -> type["SequenceLoss"]:
    LOSSES[cls.name] = cls
    return cls


@dataclass
class LossConfig:
    """The ``loss`` section of a loss without options; a loss with options subclasses it (fields with defaults,
    checks in ``__post_init__``)."""

    name: str = "sft"


def finite(section: str, **values: float) -> None:
    """A one-line ValueError for a non-finite option (the config turns it into a ConfigError)."""
    for key, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{section}.{key} = {value}; must be a finite number")


def loss_config(name: str, **options) -> Any:
    """Loss ``name``'s config section with ``options`` (ValueError naming the loss for an unknown one)."""
    if name not in LOSSES:
        raise ValueError(f"loss.name = {name!r}; expected one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name].Config(name=name, **options)


def loss_tags(cfg: Any) -> dict[str, str]:
    """MLflow tags of a loss section: the loss's name and each of its options."""
    return {"loss": cfg.name} | {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k != "name"}


@dataclass(frozen=True)
class StepTotals:
    """The whole optimizer step, across its micro batches and ranks: known before the forward pass."""

    examples: int  # SFT rows, or pairs
    tokens: int    # response (target) tokens; chosen + rejected for pairs


class SequenceLoss(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type] = LossConfig
    paired: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # on-policy: rollouts from the student, scored by a teacher
    linear: ClassVar[bool] = False

    @property
    def layout(self) -> RowLayout:
        """The rows this loss trains on: the one place that turns ``paired`` into a row layout."""
        return layout_for(self.paired)

    @classmethod
    def from_config(cls, loss_cfg) -> "SequenceLoss":
        return cls()

    def coefficients(self, counts: Tensor, totals: StepTotals) -> Tensor:
        """Per-sequence c_s [S] (float64: the kernel rounds them to its compute dtype) with share ==
        sum_s c_s * logps_s (linear losses only)."""
        raise NotImplementedError(f"{self.name} is not linear in the sequence log-probs")

    def normaliser(self, batch: dict) -> Tensor:
        """The token counts [S] the objective divides by (all response tokens, unless a span is selected)."""
        return batch["counts"]

    def token_mask(self, batch: dict) -> Optional[Tensor]:
        """Targets the objective covers ([R, T] bool), or None for every response token (linear losses)."""
        return None

    def token_coefficients(self, batch: dict, totals: StepTotals) -> Optional[Tensor]:
        """A linear loss that weighs tokens rather than whole sequences: its coefficient per position [R, T]
        (aligned with the targets), or None to use one coefficient per sequence (``coefficients``)."""
        mask = self.token_mask(batch)
        if mask is None:
            return None
        from redi_ds.data.collate import per_position

        return per_position(batch, self.coefficients(self.normaliser(batch), totals)) * mask

    def forward(self, logps: Tensor, counts: Tensor, totals: StepTotals,
                ref_logps: Optional[Tensor] = None) -> Tensor:
        """This micro batch's share of the step objective (a scalar, differentiable in logps)."""
        if not self.linear:
            raise NotImplementedError
        return (self.coefficients(counts, totals).to(logps.dtype) * logps).sum()

    def metrics(self, logps: Tensor, counts: Tensor, ref_logps: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Detached per-micro-batch means (every micro batch holds the same number of examples)."""
        return {}

    # -- shared helpers
    @staticmethod
    def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0] // 2
        return x[:b], x[b:]

    def pair_metrics(self, logps: Tensor, counts: Tensor) -> dict[str, Tensor]:
        """Length-normalised log-probs (mean over the pairs): logp_chosen, logp_rejected, their margin."""
        norm = (logps.detach() / counts.clamp(min=1).to(logps.dtype))
        c, r = self.split_pairs(norm)
        return {"logp_chosen": c.mean(), "logp_rejected": r.mean(), "margin": (c - r).mean()}


def build_loss(loss_cfg) -> SequenceLoss:
    """The loss of a config section (``cfg.loss``, or ``loss_config(name, ...)``)."""
    return LOSSES[loss_cfg.name].from_config(loss_cfg)


def per_pair(values: Tensor, totals: StepTotals) -> Tensor:
    """sum of per-pair values / pairs in the step: this micro batch's share of the step's pair mean."""
    return values.sum() / totals.examples

