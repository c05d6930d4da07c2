"""``redi-ds ablation --config ablation-tiny [--quick | --smoke] [--seeds N] [--out DIR]``

Does REDI do what the paper says? Trains a teacher and samples it (the task's), trains independent SFT bases on
its correct traces, branches from each (continued SFT, REDI at alpha 0, 0.8 and 1.0, DPO, SimPO, and the config's
other branches) over seeds, chooses each branch's hyperparameters on validation, scores every model on the same
held-out problems (greedy and sampled), and writes ``DIR/results.json`` (with the preregistration commit),
``DIR/summary.md`` (the tables and each preregistered claim's verdict, worded by its rules) and plots. A rerun
with the same ``--out`` reuses what is done. On a cluster: ``torchrun ... -m redi_ds.ablation --config
ablation-paper`` (see launch/slurm/ablation.sbatch). Exit status 2 for a bad config, 1 for a run that went wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: str = "redi-ds ablation") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[2])
    p.add_argument("--config", default="ablation-tiny", help="bundled ablation config name or YAML path")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the config's quick size (CPU: target 20 min)")
    size.add_argument("--smoke", action="store_true", help="the config's smoke size (CI: a few minutes)")
    p.add_argument("--seeds", type=int, default=None, help="stage-2 seeds (default: the config's)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<config>-<size>)")
    args = p.parse_args(argv)
    size_name = "quick" if args.quick else "smoke" if args.smoke else "full"
    command = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)

    from redi_ds.ablation.config import load_ablation
    from redi_ds.ablation.harness import Ablation, Preempted
    from redi_ds.cli import report
    from redi_ds.errors import TrainingError, UserError
    from redi_ds.ranks import is_rank0

    rank0 = is_rank0()
    try:
        cfg = load_ablation(args.config, size_name, {"seeds": args.seeds} if args.seeds else None)
        name = os.path.splitext(os.path.basename(args.config))[0]
        out = args.out or os.path.join("runs", f"{name}-{size_name}")
        from redi_ds.distributed import init_distributed

        init_distributed()
        results = Ablation(cfg, out, name, size_name, command, source=args.config).run()
    except Preempted as e:
        if rank0:
            print(f"[redi-ds] ablation {e}", flush=True)
        return 0
    except (UserError, TrainingError) as e:
        return report(e)
    if rank0:
        print(f"[redi-ds] ablation done: {os.path.join(out, 'summary.md')}")
        for key, c in results["claims"].items():
            print(f"  claim {key}: {c['verdict']}: {c['text']}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
