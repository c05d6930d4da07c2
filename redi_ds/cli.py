"""The ``train`` command: ``redi-ds train --stage sft|redi [--config NAME|PATH] [--section.key value ...]``.

The same entry as ``deepspeed launch/train.py`` (which calls :func:`main`), and as
``torchrun -m redi_ds train`` / ``deepspeed --module redi_ds train``. Every hyperparameter lives in the config
(``redi_ds/configs/*.yaml``, found by name, or a path); dotted overrides change single values. The config is
resolved and validated before any process group starts, so a typo costs no compute.

Exit status: 0 done (or stopped early for preemption, with a checkpoint), 2 a user's error (config, path, data),
1 a run that went wrong (diverged, disk full). :func:`report` is the one place that turns an error into that
one line and that status, for every ``redi-ds`` command.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from redi_ds.errors import TrainingError, UserError, exit_code
from redi_ds.ranks import is_rank0


def report(e: BaseException) -> int:
    """Print a user's or a run's error as one line (rank 0, or the rank it is local to) and give its status."""
    rank0 = is_rank0()
    if rank0 or getattr(e, "local", False):
        prefix = "" if rank0 else f"[rank {os.environ.get('RANK')}] "
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
    return exit_code(e)


def pop_local_rank(argv: list[str]) -> list[str]:
    """DeepSpeed's launcher adds ``--local_rank=N`` to the script's arguments: take it out, into LOCAL_RANK."""
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args, rest = ap.parse_known_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return rest


def _record(fn):
    """torchrun's error recorder: a rank's exception shows in the launcher's "Root Cause" block."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        return fn
    return record(fn)


def build_parser(prog: str = "redi-ds train") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train one stage of a config (sft, redi, dpo, simpo) on DeepSpeed.",
                                 epilog="Any other --section.key value overrides the config (e.g. --train.lr 1e-6, "
                                        "--loss.alpha 0.5, --data.path data/mine).", allow_abbrev=False)
    ap.add_argument("--stage", default=None, help="a stage of the config (sft, redi, dpo, simpo)")
    ap.add_argument("--config", default="tiny", help="bundled config name or YAML path (default: tiny)")
    return ap


@_record
def main(argv: Optional[Sequence[str]] = None, prog: str = "redi-ds train") -> int:
    argv = pop_local_rank(list(sys.argv[1:] if argv is None else argv))
    args, rest = build_parser(prog).parse_known_args(argv)
    try:
        results = _train_plan(args.config, args.stage, rest)
    except (UserError, TrainingError) as e:
        code = report(e)
        _close()
        return code
    for r in results:
        if r.status == "done":
            _summarise(r)
    _close()
    return 0


def _train_plan(config: str, stage: Optional[str], overrides: list[str]) -> list:
    """Train the stage (after the SFT stage it starts from, when that is missing and the config asks for it)."""
    from redi_ds.config import load_config

    cfg = load_config(config, stage=stage, overrides=overrides)
    plan = [cfg]
    if cfg.model.sft_if_missing and cfg.model.name_or_path == "@sft":
        from redi_ds.stage import StageDir

        if not StageDir(cfg.stage_dir.parent / "sft").is_done():  # missing, or killed mid-way: finish it first
            plan.insert(0, load_config(config, stage="sft", overrides=overrides))
    from redi_ds.ranks import log0
    from redi_ds.trainer import train

    results = []
    for c in plan:
        log0(f"stage {c.stage}: {c.run.output_dir}/{c.stage} (config {getattr(c, '_source', config)})")
        results.append(train(c))
        if results[-1].status == "preempted":
            break
    return results


def _summarise(r) -> None:
    """What a finished stage produced: export, held-out log-probs, accuracy, the MLflow run."""
    from redi_ds.stage import StageDir
    from redi_ds.ranks import log0

    log0(f"stage {r.stage} done: {r.steps} steps, final loss {r.final.get('loss', float('nan')):.4f}")
    if r.export:
        log0(f"  exported model: {os.path.abspath(r.export)}")
    probe = StageDir(r.stage_dir).heldout_rows()
    if probe:  # what training did to the held-out traces, even where greedy accuracy cannot move yet
        a, b = probe[0], probe[-1]
        log0(f"  held-out log-prob per token (step {a['step']} -> {b['step']}): chosen {a['logp_chosen']:.3f} -> "
             f"{b['logp_chosen']:.3f}, rejected {a['logp_rejected']:.3f} -> {b['logp_rejected']:.3f}")
    for bench, b in (r.eval or {}).get("benchmarks", {}).items():
        log0(f"  held-out accuracy on {bench}: {100 * b['pass@1']:.1f}% ({b['num_problems']} problems, "
             f"k={r.eval.get('samples')}, temperature {r.eval.get('temperature')})")
    if r.run_id:
        log0(f"  MLflow run {r.run_id} at {r.tracking_uri}  (mlflow ui --backend-store-uri {r.tracking_uri})")


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
