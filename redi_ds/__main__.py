"""``redi-ds`` / ``python -m redi_ds``: one command, a subcommand per job.

    redi-ds train --stage sft|redi [--config NAME|PATH] [--section.key value ...]
    redi-ds prepare --source TRACES --out DIR        raw teacher traces -> SFT rows + REDI pairs
    redi-ds eval --model DIR --bench math500,...     pass@1 / pass@k on the paper's benchmarks
    redi-ds negatives --model DIR --data DIR --out DIR   the student's own negatives, graded
    redi-ds ablation --config ablation-tiny          does REDI do what the paper says?

Launchers: ``torchrun --nproc_per_node N -m redi_ds train ...`` and ``deepspeed --module redi_ds train ...``
(DeepSpeed's ``--local_rank=N`` may come before the subcommand). Each subcommand has its own ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# name -> (module with main(argv, prog=...), one line of help); modules are imported only when chosen
COMMANDS = {
    "train": ("redi_ds.cli", "train one stage (sft, redi, dpo, simpo) on DeepSpeed"),
    "prepare": ("redi_ds.data.prepare", "raw teacher traces -> SFT rows and (correct, incorrect) pairs"),
    "eval": ("redi_ds.eval.__main__", "evaluate a model on the paper's math benchmarks"),
    "negatives": ("redi_ds.data.negatives", "sample and grade a model's own answers into REDI pairs"),
    "ablation": ("redi_ds.ablation.__main__", "the ablation: REDI against its baselines, with verdicts"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: redi-ds <command> [options]   (python -m redi_ds <command> ...)\n\n"
            "REDI reinforcement distillation on DeepSpeed.\n\ncommands:\n" + "\n".join(lines) +
            "\n\n'redi-ds <command> --help' gives each command's options.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from redi_ds.cli import pop_local_rank

    argv = pop_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"redi-ds: unknown command {name!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"redi-ds {name}")


if __name__ == "__main__":
    sys.exit(main())
