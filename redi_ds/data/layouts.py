"""Input layouts for ``redi_ds.data.prepare``: turn one source row into a canonical problem or a bad-row reason.

Two layouts are read:

* ``openr1``: one row per problem with ``problem``, ``answer``, ``source``, ``problem_is_valid`` and a list of
  ``generations``, plus per-generation lists parallel to it (``correctness_math_verify``, ``is_reasoning_complete``,
  ``finish_reasons``) and, in the raw release, a ``correctness`` record. That record may be a struct of lists
  (``{"llama_verification": [...], "math_verify_reparsed_answer": [...]}``) or a list of per-generation records.
* ``plain``: one row per generation with ``problem``, ``answer`` and ``response`` (rows of the same problem are
  grouped later); correctness flags, when present, are scalars on the row.

Correctness is a list of ``1`` (correct), ``0`` (incorrect) or ``-1`` (unknown: grade it) per generation.
Nothing here raises on bad data: a malformed row becomes a :class:`Bad` with a short reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from redi_ds.textio import BadLine, parse_json

PAPER_FLAGS = ("llama_verification", "math_verify_reparsed_answer")
DEFAULT_SPLIT_FLAGS = ("correctness_math_verify",)
# Per-generation lists that must be as long as ``generations`` wherever they are present.
PARALLEL_FIELDS = ("correctness_math_verify", "is_reasoning_complete", "finish_reasons")
TRUE_STRINGS = frozenset({"true", "yes", "stop", "correct"})
UNKNOWN, INCORRECT, CORRECT = -1, 0, 1

# Bad-row reasons (stable names: they are keys of stats.json).
INVALID_UTF8 = "invalid_utf8"  # a JSON Lines line that is not valid UTF-8 (never decoded with replacements)
INVALID_JSON = "invalid_json"
DUPLICATE_KEY = "duplicate_key"  # a JSON object (at any depth) with the same key twice
LONE_SURROGATE = "lone_surrogate"  # a "\\ud800" escape: not text, no tokenizer or Arrow column can hold it
NON_FINITE_ANSWER = "non_finite_answer"  # "answer": NaN or Infinity
NOT_AN_OBJECT = "not_an_object"
MISSING_PROBLEM = "missing_problem"
NON_STRING_PROBLEM = "non_string_problem"
EMPTY_PROBLEM = "empty_problem"
NON_STRING_ANSWER = "non_string_answer"
MISSING_ANSWER = "missing_answer_for_grading"
MISSING_GENERATIONS = "missing_generations"
GENERATIONS_NOT_A_LIST = "generations_not_a_list"
EMPTY_GENERATIONS = "empty_generations"
NON_STRING_TEXT = "non_string_text"
LENGTH_MISMATCH = "parallel_length_mismatch"
BAD_FLAGS = "malformed_correctness_flags"


@dataclass(frozen=True)
class Bad:
    reason: str


@dataclass
class Problem:
    problem: str
    answer: str
    source: str
    valid: Optional[bool]  # None: the row has no problem_is_valid field
    generations: list  # list[str]; blank strings are kept here and skipped at selection
    flags: list  # list[int] in {1, 0, -1}, parallel to generations
    flag_mode: str  # which flags decided correctness ("a+b"), "grader", or "mixed" (plain rows)


def blank(text: str) -> bool:
    """Empty or whitespace only (without copying a long string the way ``strip`` does)."""
    return not text or text.isspace()


def parse_flag_spec(spec: str) -> Union[str, tuple]:
    """``auto`` | ``grade`` | comma-separated flag names (all must be true for a generation to count as correct)."""
    spec = (spec or "auto").strip()
    if spec in ("auto", "grade"):
        return spec
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    if not names:
        raise ValueError(f"--flags: no flag names in {spec!r}")
    return names


def truthy(value: Any) -> bool:
    """A flag value counts as true when it is True, the number 1, or one of the strings true/yes/stop/correct."""
    if value is True:
        return True
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, float)):
        return value == 1
    if isinstance(value, str):
        return value.strip().lower() in TRUE_STRINGS
    return False


def parse_line(line: str) -> Union[dict, Bad]:
    """One JSON Lines line -> its object, or a Bad (invalid or too deep JSON, not an object, a duplicate key at any
    depth, a lone surrogate escape): the same reader as training and evaluation (redi_ds.textio)."""
    try:
        row = parse_json(line)
    except BadLine as e:
        return Bad(e.code)
    return row if isinstance(row, dict) else Bad(NOT_AN_OBJECT)


def apply_renames(row: dict, renames: tuple) -> dict:
    for old, new in renames:
        if old in row:
            row[new] = row.pop(old)
    return row


def detect_layout(keys: set) -> Optional[str]:
    if "generations" in keys:
        return "openr1"
    if "response" in keys:
        return "plain"
    return None


def _text(value: Any, missing: str, non_string: str) -> Union[str, Bad]:
    if value is None:
        return Bad(missing)
    if not isinstance(value, str):
        return Bad(non_string)
    return value


def _answer(row: dict) -> Union[str, Bad, None]:
    value = row.get("answer")
    if value is None:
        return None
    if isinstance(value, bool):
        return Bad(NON_STRING_ANSWER)
    if isinstance(value, float) and not math.isfinite(value):
        return Bad(NON_FINITE_ANSWER)
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        return Bad(NON_STRING_ANSWER)
    return value


def _validity(row: dict) -> Optional[bool]:
    if "problem_is_valid" not in row or row["problem_is_valid"] is None:
        return None
    v = row["problem_is_valid"]
    return isinstance(v, str) and v.strip().lower() == "yes"


def _source(row: dict) -> str:
    s = row.get("source")
    return "unknown" if s is None else str(s)


def _correctness_record(row: dict, n: int) -> Union[dict, Bad, None]:
    """The raw ``correctness`` record as a dict of per-generation lists (None when absent)."""
    rec = row.get("correctness")
    if rec is None:
        return None
    if isinstance(rec, dict):
        return rec
    if isinstance(rec, (list, tuple)):
        if len(rec) != n:
            return Bad(LENGTH_MISMATCH)
        if not all(isinstance(r, dict) or r is None for r in rec):
            return Bad(BAD_FLAGS)
        keys = sorted({k for r in rec if r for k in r})
        return {k: [(r or {}).get(k) for r in rec] for k in keys}
    return Bad(BAD_FLAGS)


def _flag_list(row: dict, record: Optional[dict], name: str, n: int) -> Union[list, Bad, None]:
    if row.get(name) is not None:
        value = row[name]
    elif record is not None and record.get(name) is not None:
        value = record[name]
    else:
        return None
    if not isinstance(value, (list, tuple)):
        return Bad(BAD_FLAGS)
    if len(value) != n:
        return Bad(LENGTH_MISMATCH)
    return list(value)


def _resolve_flags(row: dict, record: Optional[dict], spec, n: int) -> Union[tuple, Bad]:
    """(flags, mode) for a per-problem row; unknown flags (-1) are graded later."""
    if spec == "grade":
        return [UNKNOWN] * n, "grader"
    candidates = (PAPER_FLAGS, DEFAULT_SPLIT_FLAGS) if spec == "auto" else (spec,)
    for names in candidates:
        lists = []
        for name in names:
            got = _flag_list(row, record, name, n)
            if isinstance(got, Bad):
                return got
            if got is None:
                break
            lists.append(got)
        else:
            flags = [CORRECT if all(truthy(lst[i]) for lst in lists) else INCORRECT for i in range(n)]
            return flags, "+".join(names)
    return [UNKNOWN] * n, "grader"


def _problem_and_answer(row: dict) -> Union[tuple, Bad]:
    problem = _text(row.get("problem"), MISSING_PROBLEM, NON_STRING_PROBLEM)
    if isinstance(problem, Bad):
        return problem
    if blank(problem):
        return Bad(EMPTY_PROBLEM)
    answer = _answer(row)
    if isinstance(answer, Bad):
        return answer
    return problem, answer


def normalize_openr1(row: dict, spec) -> Union[Problem, Bad]:
    got = _problem_and_answer(row)
    if isinstance(got, Bad):
        return got
    problem, answer = got
    gens = row.get("generations")
    if gens is None:
        return Bad(MISSING_GENERATIONS)
    if not isinstance(gens, (list, tuple)):
        return Bad(GENERATIONS_NOT_A_LIST)
    if not all(isinstance(g, str) for g in gens):
        return Bad(NON_STRING_TEXT)
    n = len(gens)
    if n == 0 or all(blank(g) for g in gens):
        return Bad(EMPTY_GENERATIONS)
    if "_flags" in row:  # plain rows already grouped by problem: flags resolved per row
        flags, mode = list(row["_flags"]), str(row.get("_flag_mode") or "mixed")
        if len(flags) != n:
            return Bad(LENGTH_MISMATCH)
    else:
        record = _correctness_record(row, n)
        if isinstance(record, Bad):
            return record
        for name in PARALLEL_FIELDS:
            value = row.get(name)
            if value is not None and not isinstance(value, (list, tuple)):
                return Bad(BAD_FLAGS)
            if value is not None and len(value) != n:
                return Bad(LENGTH_MISMATCH)
        for value in (record or {}).values():
            if isinstance(value, (list, tuple)) and len(value) != n:
                return Bad(LENGTH_MISMATCH)
        resolved = _resolve_flags(row, record, spec, n)
        if isinstance(resolved, Bad):
            return resolved
        flags, mode = resolved
    if answer is None:
        if UNKNOWN in flags:
            return Bad(MISSING_ANSWER)
        answer = ""
    return Problem(problem, answer, _source(row), _validity(row), list(gens), flags, mode)


def normalize_plain(row: dict, spec) -> Union[dict, Bad]:
    """One plain (problem, answer, response) row -> a dict with a scalar flag, or a Bad."""
    got = _problem_and_answer(row)
    if isinstance(got, Bad):
        return got
    problem, answer = got
    response = _text(row.get("response"), MISSING_GENERATIONS, NON_STRING_TEXT)
    if isinstance(response, Bad):
        return response
    if blank(response):
        return Bad(EMPTY_GENERATIONS)
    flag, mode = UNKNOWN, "grader"
    if spec != "grade":
        for names in ((PAPER_FLAGS, DEFAULT_SPLIT_FLAGS) if spec == "auto" else (spec,)):
            if all(row.get(name) is not None for name in names):
                if any(isinstance(row[name], (list, tuple, dict)) for name in names):
                    return Bad(BAD_FLAGS)
                flag = CORRECT if all(truthy(row[name]) for name in names) else INCORRECT
                mode = "+".join(names)
                break
    if answer is None:
        if flag == UNKNOWN:
            return Bad(MISSING_ANSWER)
        answer = ""
    valid = _validity(row)
    return {
        "problem": problem,
        "answer": answer,
        "source": _source(row),
        "problem_is_valid": None if valid is None else ("yes" if valid else "no"),
        "response": response,
        "flag": flag,
        "flag_mode": mode,
    }
