"""No-gradient passes of the model being trained over whole datasets, all ranks together.

- ``reference_pass``: DPO's reference log-probs, once with the initial weights.
- ``HeldoutProbe``: the paper's stability plot, the held-out pairs' log-probs every few steps.

Under ZeRO-3 every rank runs the same number of forwards (gathers are collective); each computes its share of
the examples and an all-reduce assembles them.
"""

from __future__ import annotations

import math

import torch

from redi_ds.ranks import log0
from redi_ds.config import Config
from redi_ds.data.collate import collate


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def pair_index(rows, kind, n):  # sequence order within a batch: chosen rows then rejected rows
    t = torch.tensor(rows)
    return torch.cat([t, t + n]) if kind == "pairs" else t


def logprob_pass(engine, data, kind: str, pad_id: int, cfg: Config, rank: int, world: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob sums and counts of the current model for every example of ``data``, all ranks
    together ([chosen (n), rejected (n)] for pairs): no gradient, the module in eval mode."""
    import torch.distributed as dist

    n = len(data)
    sums = torch.zeros(2 * n if kind == "pairs" else n, dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
    engine.eval()
    mine = list(range(rank, n, world))
    micro = cfg.train.micro_batch_size
    steps = math.ceil(n / world / micro)  # same count on every rank (ZeRO-3 gathers are collective)
    with torch.no_grad():
        for s in range(steps):
            rows = mine[s * micro:(s + 1) * micro] or [0]
            batch = to_device(collate([data[i] for i in rows], kind, pad_id, cfg.data.padding_free), device)
            _, part, n_tok = engine.module.sequence_logprobs(batch)
            if s * micro < len(mine):
                where = pair_index(rows, kind, n).to(device)
                sums[where] = part.double()
                counts[where] = n_tok.double()
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    engine.train()
    return sums, counts


def reference_pass(engine, data, kind, pad_id, cfg: Config, rank: int, world: int, device) -> torch.Tensor:
    """Per-sequence log-prob sums of the initial model for every example (DPO's reference)."""
    sums, _ = logprob_pass(engine, data, kind, pad_id, cfg, rank, world, device)
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
    responses (``eval.heldout_pairs``), every ``eval.heldout_every`` steps and before the first; rank 0 writes
    ``heldout.jsonl`` and logs ``heldout_logp_chosen`` / ``heldout_logp_rejected`` to MLflow."""

    def __init__(self, cfg: Config, tokenizer):
        from redi_ds.data.sources import load_source
        from redi_ds.data.tokenize import ChatEncoder, encode_dataset

        raw = load_source(heldout_pairs_path(cfg.eval.heldout_pairs), "pairs")
        encoder = ChatEncoder(tokenizer, cfg.data.system_prompt)
        self.data, skipped = encode_dataset(raw, "pairs", encoder, cfg.data.max_prompt_length, cfg.data.max_length)
        self.every = cfg.eval.heldout_every
        log0(f"held-out pairs {cfg.eval.heldout_pairs}: {skipped.line()}")

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def measure(self, run, step: int) -> None:
        """One probe (collective); ``run`` is the trainer's Run."""
        sums, counts = logprob_pass(run.engine, self.data, "pairs", run.tokenizer.pad_token_id, run.cfg, run.rank,
                                    run.world, run.device)
        norm = sums / counts.clamp(min=1)
        n = len(self.data)
        row = {"step": step, "logp_chosen": float(norm[:n].mean()), "logp_rejected": float(norm[n:].mean())}
        if run.rank == 0:
            run.stage.append_metrics(row, run.stage.heldout)
            run.tracker.log_metrics({f"heldout_{k}": v for k, v in row.items() if k != "step"}, step=step)
