"""The bundled evaluation sets (``redi_ds/assets/eval``; sources and licenses in its ``SOURCES.md``).

``BENCHMARKS`` maps a name to its :class:`BenchmarkSpec`; ``load_benchmark(name)`` returns the rows as
dicts with at least ``id`` (str), ``problem`` (str), ``answer`` (str, or list of accepted variants for
the redi_rllm minerva / olympiad sets), ``subject`` and ``level`` (None where the set has none) and
``benchmark``; every source field is kept too.

Names (REDI's table columns are ``paper``: math500, aime24, amc, minerva, olympiadbench):

- ``math500``: MATH-500 (PRM800K test subset), 500 problems with subject and level.
- ``aime24``: AIME 2024, 30 problems (answers are 3 digits, e.g. ``025``).
- ``amc``: **the paper's AMC column**: REDI's rllm ``amc`` set, 83 problems (AMC 12 2022 + 2023).
- ``amc23``: the 40-problem AMC 2023 set of Qwen2.5-Math's evaluation (a subset of ``amc``).
- ``minerva``: Minerva-Math (OCW), 272 problems, answer from the solution's box.
- ``olympiadbench``: OlympiadBench OE_TO_maths_en_COMP, 675 problems.
- ``rllm_aime``, ``rllm_math``, ``rllm_minerva``, ``rllm_olympiad_bench``: the exact files REDI's repo
  evaluates on (same problems as above; minerva/olympiad answers are lists of accepted variants).

A path to a JSONL file with ``problem`` and ``answer`` fields is accepted wherever a name is.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Union

from redi_ds.eval.errors import EvalError
from redi_ds.textio import iter_jsonl


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    file: str  # relative to redi_ds/assets/eval, or an absolute path for a user file
    description: str
    num_problems: int = 0  # expected row count of a bundled file (checked on load); 0: not checked
    subject_field: Optional[str] = None  # source field copied to ``subject``
    level_field: Optional[str] = None  # source field copied to ``level`` (int)

    @property
    def path(self) -> Path:
        p = Path(self.file)
        if p.is_absolute():
            return p
        return Path(str(resources.files("redi_ds").joinpath("assets", "eval", *p.parts)))


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    BENCHMARKS[spec.name] = spec
    return spec


for _spec in (
    BenchmarkSpec("math500", "math500.jsonl", "MATH-500 (PRM800K test subset), with subject and level", 500,
                  subject_field="subject", level_field="level"),
    BenchmarkSpec("aime24", "aime24.jsonl", "AIME 2024 (Qwen2.5-Math eval copy)", 30),
    BenchmarkSpec("synthetic", "synthetic_heldout.jsonl", "32 held-out problems of the embedded default's "
                  "procedural teacher (redi_ds/data/synthetic.py)", 32),
    BenchmarkSpec("amc", "redi_rllm/amc.jsonl", "AMC 12 2022+2023, 83 problems: the REDI paper's AMC column", 83),
    BenchmarkSpec("amc23", "amc23.jsonl", "AMC 12 2023, 40 problems (Qwen2.5-Math eval 'amc23')", 40),
    BenchmarkSpec("minerva", "minerva_math.jsonl", "Minerva-Math (MIT OCW), Qwen2.5-Math eval copy", 272),
    BenchmarkSpec("olympiadbench", "olympiadbench.jsonl", "OlympiadBench OE_TO_maths_en_COMP", 675),
    BenchmarkSpec("rllm_aime", "redi_rllm/aime.jsonl", "AIME 2024 as in REDI's rllm eval", 30),
    BenchmarkSpec("rllm_math", "redi_rllm/math.jsonl", "MATH-500 as in REDI's rllm eval (no subject/level)", 500),
    BenchmarkSpec("rllm_minerva", "redi_rllm/minerva.jsonl", "Minerva-Math as in REDI's rllm eval (answer variants)",
                  272),
    BenchmarkSpec("rllm_olympiad_bench", "redi_rllm/olympiad_bench.jsonl", "OlympiadBench as in REDI's rllm eval",
                  675),
):
    register_benchmark(_spec)

ALIASES = {
    "math": "math500",
    "math-500": "math500",
    "aime": "aime24",
    "amc83": "amc",
    "rllm_amc": "amc",
    "minerva_math": "minerva",
    "olympiad_bench": "olympiadbench",
}

SUITES = {
    "paper": ["math500", "aime24", "amc", "minerva", "olympiadbench"],
    "rllm": ["rllm_math", "rllm_aime", "amc", "rllm_minerva", "rllm_olympiad_bench"],
}


def _is_path(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or "/" in name or name.startswith(".")


def get_spec(name: str) -> BenchmarkSpec:
    """The spec of a registered name (or alias), or of a user JSONL file path."""
    key = str(name).strip()
    key = ALIASES.get(key.lower(), key.lower()) if not _is_path(key) else key
    if key in BENCHMARKS:
        return BENCHMARKS[key]
    if _is_path(key):
        p = Path(key).expanduser()
        if not p.is_file():
            raise EvalError(f"benchmark file not found: {key}")
        return BenchmarkSpec(p.stem, str(p.resolve()), f"user file {p}")
    known = ", ".join(sorted(BENCHMARKS) + sorted(SUITES))
    raise EvalError(f"unknown benchmark {name!r} (known: {known}; or a path to a .jsonl file)")


def resolve_benchmarks(names: Union[str, Iterable[str]]) -> list[str]:
    """Expand a comma-separated string or list of names, aliases and suites (``paper``, ``rllm``) into
    canonical names (or file paths), in order, without duplicates. Raises :class:`EvalError` on an
    unknown name."""
    items = names.split(",") if isinstance(names, str) else [n for part in names for n in str(part).split(",")]
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        expanded = SUITES.get(item.lower(), [item])
        for n in expanded:
            spec = get_spec(n)
            key = spec.name if spec.name in BENCHMARKS and BENCHMARKS[spec.name] is spec else spec.file
            if key not in out:
                out.append(key)
    if not out:
        raise EvalError("no benchmark given")
    return out


def _bad(path: Path, lineno: int, msg: str) -> EvalError:
    return EvalError(f"malformed benchmark file {path}:{lineno}: {msg}")


def _check_answer(answer, path: Path, lineno: int):
    if isinstance(answer, bool):
        raise _bad(path, lineno, "'answer' must be a string or a list of strings")
    if isinstance(answer, (int, float)):
        return repr(answer) if isinstance(answer, float) else str(answer)
    if isinstance(answer, str) and answer.strip():
        return answer
    if isinstance(answer, list) and answer and all(isinstance(a, (str, int, float)) and str(a).strip()
                                                   for a in answer):
        return [str(a) for a in answer]
    raise _bad(path, lineno, "'answer' must be a non-empty string or a non-empty list of strings")


def load_benchmark(name: str) -> list[dict]:
    """Rows of a benchmark (a registered name, alias, or JSONL path): dicts with ``id`` (str),
    ``problem``, ``answer`` (str or list of accepted variants), ``subject``, ``level``, ``benchmark``
    and the source fields. A malformed file raises :class:`EvalError` naming the file and line."""
    spec = get_spec(name)
    path = spec.path
    rows: list[dict] = []
    seen: set[str] = set()
    try:
        records = list(iter_jsonl(str(path)))
    except OSError as e:
        raise EvalError(f"cannot read benchmark file {path}: {e.strerror or e}") from None
    for lineno, src, bad in records:  # not UTF-8, invalid JSON, a duplicate key, a lone surrogate: one line
        if bad:
            raise _bad(path, lineno, bad)
        problem = src.get("problem", src.get("question"))
        if not isinstance(problem, str) or not problem.strip():
            raise _bad(path, lineno, "missing or empty 'problem'")
        if "answer" not in src:
            raise _bad(path, lineno, "missing 'answer'")
        row = dict(src)
        row["problem"] = problem
        row["answer"] = _check_answer(src["answer"], path, lineno)
        rid = src.get("id", src.get("unique_id", len(rows)))
        if isinstance(rid, (dict, list)) or rid is None:
            raise _bad(path, lineno, "'id' must be a string or a number")
        row["id"] = str(rid)
        if row["id"] in seen:
            raise _bad(path, lineno, f"duplicate id {row['id']!r}")
        seen.add(row["id"])
        row["subject"] = src.get(spec.subject_field) if spec.subject_field else src.get("subject")
        level = src.get(spec.level_field) if spec.level_field else src.get("level")
        if level is not None:
            try:
                level = int(str(level).replace("Level", "").strip())
            except ValueError:
                raise _bad(path, lineno, f"'level' must be an integer, got {level!r}") from None
        row["level"] = level
        row["benchmark"] = spec.name
        rows.append(row)
    if not rows:
        raise EvalError(f"benchmark file {path} has no rows")
    if spec.num_problems and len(rows) != spec.num_problems:
        raise EvalError(f"benchmark file {path} has {len(rows)} rows, expected {spec.num_problems}")
    return rows
