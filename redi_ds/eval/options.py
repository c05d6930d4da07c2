"""``EvalOptions``: the settings of one evaluation, shared by ``run_eval``, the CLI and the trainer's config.

A plain dataclass whose fields are only ``int``, ``float``, ``str``, ``bool``, ``Optional[...]`` of those, and
``dict``, so that it can also be a section of the typed YAML config tree (:mod:`redi_ds.config` coerces those
types). The run context (output folder, MLflow run, ranks, progress) is not part of it: those are keyword
arguments of :func:`redi_ds.eval.runner.run_eval`. Importing this module is light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from redi_ds.eval.errors import EvalError
from redi_ds.eval.prompting import PAPER_INSTRUCTION


@dataclass
class EvalOptions:
    """Sampling, prompting, backend and grading settings (see :func:`redi_ds.eval.runner.run_eval`).

    ``samples`` per problem at ``temperature`` / ``top_p`` (temperature 0: greedy), at most ``max_new_tokens``
    each; ``limit`` > 0 keeps the first N problems of each benchmark. ``batch_size``: sequences per ``generate``
    call (hf) or prompts per submission (vllm); None: the backend's default. Prompting: see
    :mod:`redi_ds.eval.prompting` (``system_prompt=None`` for no system turn; ``chat_template`` a bundled name
    or a .jinja path; ``force_think`` opens the answer with ``<think>``). ``backend_options`` go to the
    backend's constructor (vllm: ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``).
    ``seed`` is offset by the rank in data-parallel runs. ``grade_workers`` / ``grade_timeout``: grader
    processes and seconds per grade (None: the grader's defaults).
    """

    samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 4096
    limit: int = 0
    batch_size: Optional[int] = None
    system_prompt: Optional[str] = PAPER_INSTRUCTION
    user_template: str = "{problem}"
    force_think: bool = False
    chat_template: Optional[str] = None
    tokenizer: Optional[str] = None
    backend: str = "auto"
    backend_options: dict = field(default_factory=dict)
    dtype: str = "auto"
    seed: int = 0
    grade_workers: Optional[int] = None
    grade_timeout: Optional[float] = None

    def check(self) -> None:
        """Raise :class:`EvalError` (one line) for out-of-range settings."""
        samples = _integer("samples", self.samples)
        max_new_tokens = _integer("max_new_tokens", self.max_new_tokens)
        limit = _integer("limit", self.limit)
        temperature, top_p = _number("temperature", self.temperature), _number("top_p", self.top_p)
        if samples < 1:
            raise EvalError(f"samples must be >= 1, got {self.samples}")
        if not (0 <= temperature < float("inf") and 0 < top_p <= 1):
            raise EvalError(f"need a finite temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, "
                            f"{self.top_p}")
        if max_new_tokens < 1 or limit < 0:
            raise EvalError(f"need max_new_tokens >= 1 and limit >= 0, got {self.max_new_tokens}, {self.limit}")
        if self.batch_size is not None and _integer("batch_size", self.batch_size) < 1:
            raise EvalError(f"batch_size must be >= 1 (or unset), got {self.batch_size}")


def _integer(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise EvalError(f"{name} must be an integer, got {value!r}") from None


def _number(name: str, value) -> float:
    try:
        return float(value)  # NaN fails the range checks
    except (TypeError, ValueError):
        raise EvalError(f"{name} must be a number, got {value!r}") from None
