"""No-gradient passes of the model being trained over whole datasets, all ranks together.

- ``reference_pass``: DPO's reference log-probs, once with the initial weights.
- ``HeldoutProbe``: the paper's stability plot, the held-out pairs' log-probs every few steps.

Under ZeRO-3 every rank runs the same number of forwards (gathers are collective); each computes its share of
the examples and an all-reduce assembles them. Each pass takes the few values it reads: the engine, the
examples, a :class:`Batcher` and the micro batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from redi_ds.data.collate import collate
from redi_ds.data.layout import PAIRS, RowLayout
from redi_ds.ranks import log0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass(frozen=True)
class Batcher:
    """How encoded examples become a batch on this rank's device."""

    layout: RowLayout
    pad_id: int
    padding_free: bool
    device: torch.device

    def __call__(self, examples: list[dict]) -> dict:
        return to_device(collate(examples, self.layout, self.pad_id, self.padding_free), self.device)

    def with_layout(self, layout: RowLayout) -> "Batcher":
        return Batcher(layout, self.pad_id, self.padding_free, self.device)


def logprob_pass(engine, data, batcher: Batcher, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob sums and counts of the current model for every example of ``data``, all ranks
    together (laid out by ``batcher.layout.sequence_index``): no gradient, the module in eval mode."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    layout, n = batcher.layout, len(data)
    sums = torch.zeros(layout.sequences_per_example * n, dtype=torch.float64, device=batcher.device)
    counts = torch.zeros_like(sums)
    engine.eval()
    mine = list(range(rank, n, world))
    steps = math.ceil(n / world / micro)  # same count on every rank (ZeRO-3 gathers are collective)
    with torch.no_grad():
        for s in range(steps):
            rows = mine[s * micro:(s + 1) * micro] or [0]
            _, part, n_tok = engine.module.sequence_logprobs(batcher([data[i] for i in rows]))
            if s * micro < len(mine):
                where = layout.sequence_index(rows, n).to(batcher.device)
                sums[where] = part.double()
                counts[where] = n_tok.double()
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    engine.train()
    return sums, counts


def reference_pass(engine, data, batcher: Batcher, micro: int) -> torch.Tensor:
    """Per-sequence log-prob sums of the initial model for every example (DPO's reference)."""
    sums, _ = logprob_pass(engine, data, batcher, micro)
    log0(f"reference log-probs computed for {len(data)} examples")
    return sums


BUNDLED_PAIRS = {"synthetic": "synthetic_heldout_pairs.jsonl"}  # the embedded default's 32 held-out problems


def heldout_pairs_path(value: str) -> str:
    """``eval.heldout_pairs``: a bundled name (redi_ds/assets/data) or a path / source for redi_ds.data."""
    if value in BUNDLED_PAIRS:
        from importlib import resources

        return str(resources.files("redi_ds").joinpath("assets", "data", BUNDLED_PAIRS[value]))
    return value


class HeldoutProbe:
    """The paper's stability plot: the mean length-normalised log-prob of held-out chosen and rejected
    responses (``eval.heldout_pairs``), every ``eval.heldout_every`` steps and before the first. ``measure``
    returns the row; the trainer writes ``heldout.jsonl`` and logs ``heldout_logp_*`` to MLflow."""

    def __init__(self, source: str, every: int, encode, batcher: Batcher, micro: int):
        """``encode(raw, layout) -> (dataset, SkipReport)``: the run's own tokenization and limits."""
        from redi_ds.data.sources import load_source

        path = heldout_pairs_path(source)
        self.data, skipped = encode(load_source(path, PAIRS), PAIRS)
        self.every, self.batcher, self.micro = every, batcher.with_layout(PAIRS), micro
        self.kinds = _kinds(path, len(self.data), skipped)
        log0(f"held-out pairs {source}: {skipped.line()}")

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def measure(self, engine, step: int) -> dict:
        """One probe (collective): {step, logp_chosen, logp_rejected}."""
        sums, counts = logprob_pass(engine, self.data, self.batcher, self.micro)
        norm = sums / counts.clamp(min=1)
        n = len(self.data)
        row = {"step": step, "logp_chosen": float(norm[:n].mean()), "logp_rejected": float(norm[n:].mean())}
        for kind in sorted(set(self.kinds or ())):  # the means per kind of pair (a JSONL's ``kind`` column)
            pick = torch.tensor([k == kind for k in self.kinds])
            row[f"logp_chosen/{kind}"] = float(norm[:n][pick].mean())
            row[f"logp_rejected/{kind}"] = float(norm[n:][pick].mean())
        return row


def _kinds(path: str, n: int, skipped) -> Optional[list[str]]:
    """The ``kind`` of each held-out pair of a JSONL file that has that column (None otherwise); every row must
    have been encoded, so that kinds and rows line up."""
    from redi_ds.errors import ConfigError
    from redi_ds.textio import iter_jsonl

    if not path.endswith(".jsonl"):
        return None
    kinds = [row.get("kind") if isinstance(row, dict) else None for _, row, _ in iter_jsonl(path)]
    if not any(isinstance(k, str) for k in kinds):
        return None
    if len(kinds) != n or not all(isinstance(k, str) for k in kinds):
        raise ConfigError(f"eval.heldout_pairs {path}: a 'kind' column needs a string kind on every row and no "
                          f"skipped row ({skipped.line()})")
    return kinds
