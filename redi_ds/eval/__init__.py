"""Evaluation: bundled math benchmarks, a hang-proof grader, and ``run_eval`` / ``python -m redi_ds.eval``.

Importing this package is light (no torch, transformers, mlflow or math-verify): those are imported
inside the functions that need them.

- ``grade(response, gold) -> bool``: last ``\\boxed{}`` vs gold with math-verify (see ``grading``).
- ``load_benchmark(name) -> list[dict]`` and ``BENCHMARKS`` (see ``benchmarks``).
- ``run_eval(model, benchmarks, EvalOptions(...), out_dir=...) -> dict``: generate, grade, write
  ``samples.jsonl`` / ``summary.json`` / a plot, log to MLflow (see ``runner``); ``EvalOptions`` holds the
  settings (sampling, prompting, backend, grading; see ``options``).
"""

from redi_ds.eval.benchmarks import ALIASES, BENCHMARKS, SUITES, BenchmarkSpec, load_benchmark, resolve_benchmarks
from redi_ds.eval.errors import EvalError
from redi_ds.eval.grading import GradeError, extract_answer, grade, grade_answer, grade_many, shutdown_workers
from redi_ds.eval.metrics import pass1_stderr, pass_at_k
from redi_ds.eval.options import EvalOptions
from redi_ds.eval.prompting import PAPER_INSTRUCTION, build_prompt
from redi_ds.eval.runner import run_eval

__all__ = [
    "ALIASES",
    "BENCHMARKS",
    "SUITES",
    "BenchmarkSpec",
    "EvalError",
    "EvalOptions",
    "GradeError",
    "PAPER_INSTRUCTION",
    "build_prompt",
    "extract_answer",
    "grade",
    "grade_answer",
    "grade_many",
    "load_benchmark",
    "pass1_stderr",
    "pass_at_k",
    "resolve_benchmarks",
    "run_eval",
    "shutdown_workers",
]
