"""Train one stage: ``deepspeed launch/train.py --stage sft|redi [--config NAME|PATH] [--section.key value ...]``.

Also runs under ``torchrun`` and plain ``python`` (one process). Every hyperparameter lives in the config
(``redi_ds/configs/*.yaml``, found by name, or a path); dotted overrides change single values. The config
is resolved and validated before any process group starts, so a typo costs no compute.
"""

from __future__ import annotations

import argparse
import os
import sys


def _record(fn):
    """torchrun's error recorder: a rank's exception shows in the launcher's "Root Cause" block."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        return fn
    return record(fn)


@_record
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--stage", default=None, help="a stage of the config (sft, redi, ...)")
    ap.add_argument("--config", default="tiny", help="bundled config name or YAML path (default: tiny)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from redi_ds.config import ConfigError, load_config
    from redi_ds.data import DataError
    from redi_ds.errors import TrainingError

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg = load_config(args.config, stage=args.stage, overrides=rest)
        plan = [cfg]
        if cfg.model.sft_if_missing and cfg.model.name_or_path == "@sft":
            from redi_ds.model import resolve_model_path

            if not os.path.isdir(resolve_model_path("@sft", cfg.run.output_dir)):
                plan.insert(0, load_config(args.config, stage="sft", overrides=rest))
        from redi_ds.stage import StageDir
        from redi_ds.trainer import log0, train

        results = []
        for c in plan:
            log0(f"stage {c.stage}: {c.run.output_dir}/{c.stage} (config {getattr(c, '_source', args.config)})")
            results.append(train(c))
            if results[-1].status == "preempted":
                break
    except (ConfigError, DataError, TrainingError) as e:
        if rank0 or getattr(e, "local", False):
            prefix = "" if rank0 else f"[rank {os.environ.get('RANK')}] "
            print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        _close()
        return 1 if isinstance(e, TrainingError) else 2
    for r in results:
        if r.status != "done":
            continue
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
    _close()
    return 0


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
