"""Bundled benchmarks: registry, loading, schema, and one-line errors for bad names and files."""

import json

import pytest

from redi_ds.eval import BENCHMARKS, EvalError, load_benchmark, resolve_benchmarks
from redi_ds.eval.benchmarks import get_spec

EXPECTED_ROWS = {
    "math500": 500, "aime24": 30, "amc": 83, "amc23": 40, "minerva": 272, "olympiadbench": 675,
    "rllm_aime": 30, "rllm_math": 500, "rllm_minerva": 272, "rllm_olympiad_bench": 675, "synthetic": 32,
}


def test_registry_covers_every_bundled_file():
    assert set(BENCHMARKS) == set(EXPECTED_ROWS)
    bundled = {p.relative_to(BENCHMARKS["math500"].path.parent).as_posix()
               for p in BENCHMARKS["math500"].path.parent.rglob("*.jsonl")}
    assert bundled == {s.file for s in BENCHMARKS.values()}
    assert (BENCHMARKS["math500"].path.parent / "SOURCES.md").is_file()
    for spec in BENCHMARKS.values():
        assert "/work/shared" not in str(spec.path)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_load_benchmark_schema(name):
    rows = load_benchmark(name)
    assert len(rows) == EXPECTED_ROWS[name]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert isinstance(r["id"], str) and r["problem"].strip() and r["benchmark"] == name
        assert isinstance(r["answer"], (str, list)) and r["answer"]
        assert "subject" in r and "level" in r


def test_math500_has_subjects_and_levels():
    rows = load_benchmark("math500")
    assert {r["level"] for r in rows} == {1, 2, 3, 4, 5}
    assert len({r["subject"] for r in rows}) == 7
    assert sum(r["level"] == 5 for r in rows) == 134


def test_amc_is_the_papers_83_problem_set_and_contains_amc23():
    amc, amc23 = load_benchmark("amc"), load_benchmark("amc23")
    assert len(amc) == 83 and len(amc23) == 40
    by_problem = {r["problem"]: r["answer"] for r in amc}
    assert all(by_problem.get(r["problem"]) == r["answer"] for r in amc23)
    assert get_spec("amc83") is BENCHMARKS["amc"]


def test_variant_answers_and_raw_forms_are_kept():
    assert all(isinstance(r["answer"], list) for r in load_benchmark("rllm_minerva"))
    assert load_benchmark("aime24")[7]["answer"] == "025"
    assert load_benchmark("amc23")[0]["answer"] == "27.0"


def test_resolve_benchmarks_names_aliases_suites():
    assert resolve_benchmarks("math500,aime24, amc") == ["math500", "aime24", "amc"]
    assert resolve_benchmarks(["paper"]) == ["math500", "aime24", "amc", "minerva", "olympiadbench"]
    assert resolve_benchmarks("minerva_math,minerva") == ["minerva"]


@pytest.mark.parametrize("bad", ["math5000", "gsm8k", ""])
def test_unknown_benchmark_is_a_one_line_error(bad):
    with pytest.raises(EvalError) as e:
        resolve_benchmarks(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content,fragment", [
    ('{"id": 1, "problem": "p", "answer": "1"}\n{"id": 2, "problem": "q", "answer": "2"\n', ":2: invalid JSON"),
    ('{"id": 1, "problem": "", "answer": "1"}\n', "empty 'problem'"),
    ('{"id": 1, "problem": "p"}\n', "missing 'answer'"),
    ('{"id": 1, "problem": "p", "answer": []}\n', "'answer'"),
    ('{"id": 1, "problem": "p", "answer": "1"}\n{"id": 1, "problem": "q", "answer": "2"}\n', "duplicate id"),
    ('[1, 2]\n', "JSON object"),
    ('{"id": 1, "problem": "p", "answer": "1", "level": "hard"}\n', "'level'"),
    ("", "no rows"),
])
def test_malformed_file_is_a_one_line_error(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(EvalError) as e:
        load_benchmark(str(path))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_user_jsonl_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"1+{i}?", "answer": 1 + i}) for i in range(3)) + "\n")
    rows = load_benchmark(str(path))
    assert [(r["id"], r["answer"], r["benchmark"]) for r in rows] == [("0", "1", "mine"), ("1", "2", "mine"),
                                                                      ("2", "3", "mine")]
    with pytest.raises(EvalError, match="not found"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
