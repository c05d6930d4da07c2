"""``python -m redi_ds.eval --model PATH_OR_NAME --bench math500,aime24,amc,minerva,olympiadbench [...]``

Prints a table, writes ``samples.jsonl``, ``summary.json`` and a plot to ``--out`` (default: a new
folder ``eval-<model>-<time>`` under the current directory). A user error (bad model path, unknown
benchmark, malformed data file) prints ``error: ...`` and exits with status 2. Data parallel: launch
with ``torchrun --nproc-per-node N -m redi_ds.eval ... --out DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Optional, Sequence

from redi_ds.eval.backends import AUTO_ORDER, BACKENDS
from redi_ds.eval.benchmarks import ALIASES, BENCHMARKS, SUITES
from redi_ds.cli import report
from redi_ds.eval.errors import EvalError
from redi_ds.eval.options import EvalOptions
from redi_ds.eval.prompting import CHAT_TEMPLATES


def build_parser(prog: str = "redi-ds eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a model on the bundled math benchmarks (pass@1 over k samples, graded with math-verify).",
        epilog="benchmarks: " + ", ".join(f"{n} ({s.description})" for n, s in BENCHMARKS.items())
        + "; suites: " + ", ".join(f"{k}={','.join(v)}" for k, v in SUITES.items())
        + "; aliases: " + ", ".join(f"{k}->{v}" for k, v in ALIASES.items()),
    )
    p.add_argument("--model", required=True, help="HF model folder or hub name")
    p.add_argument("--bench", default="math500", help="comma-separated benchmarks / suites / .jsonl paths")
    p.add_argument("--out", default=None, help="output folder")
    add_option_args(p)
    p.add_argument("--mlflow-run-id", default=None, help="log to this (training) run")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--mlflow-experiment", default="redi-ds-eval", help="experiment of a new run (no --mlflow-run-id)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary JSON after the table")
    return p


def add_option_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The command-line options of :class:`EvalOptions` (``defaults`` override its defaults); shared by this CLI
    and ``python -m redi_ds.data.negatives``."""
    d = dataclasses.replace(EvalOptions(), **defaults)
    p.add_argument("--samples", type=int, default=d.samples, help="samples per problem (k); the paper uses 16")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--limit", type=int, default=d.limit, help="first N problems of each benchmark (0: all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="hf: sequences per generate call (16); vllm: prompts per submission (512)")
    p.add_argument("--backend", default=d.backend, help=f"auto ({' > '.join(AUTO_ORDER)}) or one of {sorted(BACKENDS)}")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer path / hub name, or a bundled one (qwen2.5)")
    p.add_argument("--chat-template", default=d.chat_template,
                   help=f"a .jinja path or one of {sorted(CHAT_TEMPLATES)} (default: the tokenizer's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--system-prompt", default=d.system_prompt, help="system turn (default: the paper's instruction)")
    g.add_argument("--no-system-prompt", action="store_true", help="no system turn (the template's default applies)")
    p.add_argument("--user-template", default=d.user_template, help="user turn, with a {problem} placeholder")
    p.add_argument("--force-think", action="store_true", help="open the answer with '<think>\\n' (R1-style models)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm only")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm only")
    p.add_argument("--max-model-len", type=int, default=None, help="vllm only")
    p.add_argument("--grade-workers", type=int, default=d.grade_workers,
                   help="grader processes (default: CPUs, at most 8)")
    p.add_argument("--grade-timeout", type=float, default=d.grade_timeout, help="seconds per grade (default 10)")


def command_line(model: str, bench: str, options: EvalOptions) -> str:
    """The ``python -m redi_ds.eval`` command that evaluates with exactly ``options`` (every setting spelled
    out, so that it re-scores a model to the same number whatever the defaults become)."""
    o = options
    argv = ["python", "-m", "redi_ds.eval", "--model", model, "--bench", bench, "--samples", str(o.samples),
            "--temperature", repr(o.temperature), "--top-p", repr(o.top_p), "--max-new-tokens", str(o.max_new_tokens),
            "--limit", str(o.limit), "--backend", o.backend, "--dtype", o.dtype, "--seed", str(o.seed),
            "--user-template", o.user_template]
    argv += ["--no-system-prompt"] if o.system_prompt is None else ["--system-prompt", o.system_prompt]
    for flag, value in (("--batch-size", o.batch_size), ("--tokenizer", o.tokenizer),
                        ("--chat-template", o.chat_template), ("--grade-workers", o.grade_workers),
                        ("--grade-timeout", o.grade_timeout)):
        if value is not None:
            argv += [flag, str(value)]
    if o.force_think:
        argv.append("--force-think")
    for key, value in (o.backend_options or {}).items():
        if value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(a) if a != "{export}" else a for a in argv)


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The evaluation settings of the parsed command line: every :class:`EvalOptions` field is the option of
    the same name (``--top-p`` -> ``top_p``), except ``system_prompt`` (None with ``--no-system-prompt``) and
    ``backend_options`` (the vllm-only options)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalOptions) if f.name != "backend_options"}
    if args.no_system_prompt:
        values["system_prompt"] = None
    if args.backend in ("vllm", "auto"):
        values["backend_options"] = {"tensor_parallel_size": args.tensor_parallel_size,
                                     "gpu_memory_utilization": args.gpu_memory_utilization,
                                     "max_model_len": args.max_model_len}
    return EvalOptions(**values)


def main(argv: Optional[Sequence[str]] = None, prog: str = "redi-ds eval") -> int:
    args = build_parser(prog).parse_args(argv)
    from redi_ds.eval.runner import dist_env, run_eval

    try:
        rank, world_size = dist_env()  # torchrun: data parallel over the launched ranks
        summary = run_eval(
            args.model,
            args.bench,
            options_from_args(args),
            out_dir=args.out,
            mlflow_run_id=args.mlflow_run_id,
            tracking_uri=args.tracking_uri,
            mlflow_experiment=args.mlflow_experiment,
            progress=not args.no_progress,
            rank=rank,
            world_size=world_size,
        )
    except EvalError as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if summary:
        print(f"results: {summary['out_dir']}")
        if args.json:
            print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
