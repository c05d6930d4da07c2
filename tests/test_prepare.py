"""redi_ds.data.prepare: the paper recipe, pairing options, length limits, decontamination, determinism,
bad rows, the grader path and CLI errors. Small hand-made inputs; num_proc=1 except the determinism test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from glob import glob
from importlib import resources

import pytest
from datasets import Dataset, load_from_disk

from redi_ds.data import decontam, layouts, prepare_map
from redi_ds.data.prepare import PAPER_TEMPLATE, PrepareError, PrepareOptions, main, prepare

MATH500_ID = "test/algebra/2584.json"  # 'If $f(x) = \frac{3x-2}{x-2}$, what is the value of $f(-2) +f(-1)+f(0)$? ...'


def _write(path, rows, extra_lines=()):
    """JSON Lines: ``rows`` then ``extra_lines`` verbatim (str, or bytes for lines that are not UTF-8)."""
    with open(path, "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode("utf-8") + b"\n")
        for line in extra_lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return str(path)


def _run(tmp_path, rows, name="out", extra_lines=(), **kw):
    src = _write(tmp_path / f"{name}.jsonl", rows, extra_lines)
    kw.setdefault("decontam", False)
    out = str(tmp_path / name)
    stats = prepare(PrepareOptions(source=src, out=out, quiet=True, **kw))
    sft, pairs = load_from_disk(f"{out}/sft"), load_from_disk(f"{out}/pairs")
    with open(f"{out}/stats.json") as f:
        assert json.load(f) == json.loads(json.dumps(stats))
    return stats, sft, pairs


def _raw(pid, gens, llama, mv, source="olympiads", valid="yes", answer="1", records=False):
    if records:
        corr = [{"llama_verification": a, "math_verify_answer": b, "math_verify_reparsed_answer": b}
                for a, b in zip(llama, mv)]
    else:
        corr = {"llama_verification": llama, "math_verify_answer": mv, "math_verify_reparsed_answer": mv}
    return {"problem": f"Problem {pid}: compute the quantity number {pid}.", "answer": answer, "source": source,
            "problem_is_valid": valid, "generations": gens, "correctness": corr}


def test_paper_recipe_on_raw_rows(tmp_path):
    planted = [json.loads(x) for x in open(resources.files("redi_ds") / "assets/eval/math500.jsonl")]
    planted = next(r["problem"] for r in planted if r["id"] == MATH500_ID)
    rows = [
        _raw(1, ["1a", "1b", "1c"], [True, True, False], [True, False, False]),  # 1b: llama only -> incorrect
        _raw(2, ["2a"], [True], [True], valid="no"),  # invalid
        _raw(3, ["3a", "3b"], [True, False], [True, False], source="cn_k12"),  # excluded source
        _raw(4, ["4a", "4b"], [True, True], [True, True]),  # all correct: SFT only
        _raw(5, ["5a", "5b"], [False, True], [True, False]),  # never both true: nothing
        _raw(6, ["6a", "6b", "6c"], [True, True, True], [None, True, False], source="amc_aime"),  # None = false
        _raw(7, ["7a", "7b"], [False, True], [False, True], records=True),  # list-of-records correctness
        _raw(8, ["8a", "8b"], [True, False], [True, False]) | {"problem": planted},  # contaminated
        _raw(9, ["9a", "9b"], [True], [True]),  # bad: parallel lists of different lengths
        _raw(10, ["", "10b", "10c"], [True, True, False], [True, True, False], valid=" Yes "),  # blank gen skipped
    ]
    stats, sft, pairs = _run(tmp_path, rows, decontam=True)
    c = stats["counts"]
    assert (c["input_rows"], c["bad_rows"], c["problems"]) == (10, 1, 9)
    assert (c["invalid_problem"], c["source_excluded"], c["contaminated"], c["kept_problems"]) == (1, 1, 1, 6)
    assert (c["sft_candidates"], c["sft_rows"], c["pair_candidates"], c["pairs"]) == (5, 5, 4, 4)
    assert stats["bad_rows"]["by_reason"] == {"parallel_length_mismatch": 1}
    assert stats["bad_rows"]["examples"]["parallel_length_mismatch"] == ["out.jsonl:9"]
    assert stats["decontamination"]["matched_eval_ids"] == [f"math500:{MATH500_ID}"]
    assert stats["generations"]["empty_text"] == 1
    assert stats["per_source"]["amc_aime"] == {
        "problems": 1, "generations": 3, "correct": 1, "pass_rate": 0.3333, "problems_with_correct": 1,
        "problem_pass_rate": 1.0, "sft_rows": 1, "pairs": 1}
    # Output order: the input shuffled exactly like Dataset.shuffle(seed=42) (the paper's script).
    order = [r["problem"] for r in Dataset.from_list([{"problem": r["problem"]} for r in rows]).shuffle(seed=42)]
    want_sft = {1: "1a", 4: "4a", 6: "6b", 7: "7b", 10: "10b"}
    want_pairs = {1: ("1a", "1b"), 6: ("6b", "6a"), 7: ("7b", "7a"), 10: ("10b", "10c")}
    by_problem = {r["problem"]: i + 1 for i, r in enumerate(rows)}
    assert sft["response"] == [want_sft[by_problem[p]] for p in order if by_problem[p] in want_sft]
    assert list(zip(pairs["chosen"], pairs["rejected"])) == [
        want_pairs[by_problem[p]] for p in order if by_problem[p] in want_pairs]
    assert sft.column_names == ["problem", "response", "answer", "source"]
    assert pairs.column_names == ["prompt", "chosen", "rejected", "answer", "source"]
    assert set(pairs["source"]) == {"olympiads", "amc_aime"} and set(pairs["answer"]) == {"1"}


@pytest.mark.parametrize(
    "pairing,max_pairs,want",
    [
        ("first", 0, [("c1", "w1")]),
        ("zip", 0, [("c1", "w1"), ("c2", "w2")]),
        ("all", 0, [("c1", "w1"), ("c1", "w2"), ("c2", "w1"), ("c2", "w2"), ("c3", "w1"), ("c3", "w2")]),
        ("all", 4, [("c1", "w1"), ("c1", "w2"), ("c2", "w1"), ("c2", "w2")]),
    ],
)
def test_pairing_options(tmp_path, pairing, max_pairs, want):
    flags = [True, False, True, False, True]
    row = {"problem": "p", "answer": "1", "generations": ["c1", "w1", "c2", "w2", "c3"],
           "correctness_math_verify": flags, "is_reasoning_complete": flags, "finish_reasons": ["stop"] * 5}
    stats, sft, pairs = _run(tmp_path, [row], pairing=pairing, max_pairs=max_pairs)
    assert list(zip(pairs["chosen"], pairs["rejected"])) == want
    assert stats["counts"]["pairs"] == len(want) and sft["response"] == ["c1"]
    assert stats["generations"]["correctness_from"] == {"correctness_math_verify": 1}


def test_no_pairs_and_no_sft_still_load(tmp_path):
    row = {"problem": "p", "answer": "1", "generations": ["a", "b"], "correctness_math_verify": [True, True]}
    stats, sft, pairs = _run(tmp_path, [row])
    assert len(sft) == 1 and len(pairs) == 0 and pairs.column_names == ["prompt", "chosen", "rejected", "answer",
                                                                         "source"]
    stats, sft, _ = _run(tmp_path, [row | {"correctness_math_verify": [False, False]}], name="none")
    assert len(sft) == 0 and sft.column_names == ["problem", "response", "answer", "source"]


def test_flags_option_selects_the_flags(tmp_path):
    row = {"problem": "p", "answer": "1", "generations": ["a", "b"], "correctness_math_verify": [True, True],
           "is_reasoning_complete": [False, True]}
    _, sft, pairs = _run(tmp_path, [row], flags="correctness_math_verify,is_reasoning_complete")
    assert sft["response"] == ["b"] and list(zip(pairs["chosen"], pairs["rejected"])) == [("b", "a")]


def test_arrow_sources_parquet_and_saved_dataset(tmp_path):
    # the raw release's correctness record as an Arrow struct of lists, and as a list of structs
    rows = [_raw(1, ["1a", "1b"], [True, False], [True, False]), _raw(2, ["2a", "2b"], [False, True], [True, True])]
    recs = [_raw(1, ["1a", "1b"], [True, False], [True, False], records=True),
            _raw(2, ["2a", "2b"], [False, True], [True, True], records=True)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "raw.parquet"))
    Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
    for src in ("raw.parquet", "saved"):
        stats = prepare(PrepareOptions(source=str(tmp_path / src), out=str(tmp_path / f"o-{src}"), seed=-1,
                                       decontam=False, quiet=True))
        pairs = load_from_disk(str(tmp_path / f"o-{src}" / "pairs"))
        assert list(zip(pairs["chosen"], pairs["rejected"])) == [("1a", "1b"), ("2b", "2a")], src
        assert stats["bad_rows"]["examples"] == {} and stats["counts"]["sft_rows"] == 2
    # the source folder gets no cache files
    assert sorted(os.listdir(tmp_path / "saved")) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                       "state.json"]


def test_length_limits_with_real_tokenizer(tmp_path):
    tok = prepare_map.get_tokenizer(str(resources.files("redi_ds") / "assets/tokenizer/qwen2.5"))
    template = (resources.files("redi_ds") / "assets/tokenizer/qwen2.5" / PAPER_TEMPLATE).read_text()
    n_tok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731

    def prompt_len(p):
        msgs = [{"role": "system", "content": PrepareOptions.system_prompt}, {"role": "user", "content": p}]
        return len(tok.apply_chat_template(msgs, add_generation_prompt=True, chat_template=template)["input_ids"])

    short = ["What is two plus two? (a)", "What is two plus two? (b)", "What is two plus two? (c)"]
    long_ = "What is two plus two? " + "Think about it carefully. " * 6
    ok, ok_plus = "So the answer is \\boxed{4}." + " yes" * 10, "So the answer is \\boxed{4}." + " yes" * 11
    R, P = n_tok(ok), prompt_len(short[0])
    assert n_tok(ok_plus) == R + 1 and {prompt_len(s) for s in short} == {P} and prompt_len(long_) > P
    f = lambda prob, gens, flags: {"problem": prob, "answer": "4", "generations": gens,  # noqa: E731
                                   "correctness_math_verify": flags}
    rows = [
        f(short[0], [ok, ok], [True, False]),  # exactly at both limits: kept
        f(long_, [ok, ok], [True, False]),  # prompt over the limit
        f(short[1], [ok_plus, ok], [True, False]),  # chosen over
        f(short[2], [ok, ok_plus], [True, False]),  # rejected over
    ]
    stats, sft, pairs = _run(tmp_path, rows, seed=-1, max_prompt_tokens=P, max_response_tokens=R,
                             sft_max_tokens=P + R)
    c = stats["counts"]
    assert (c["pairs_prompt_too_long"], c["pairs_chosen_too_long"], c["pairs_rejected_too_long"]) == (1, 1, 1)
    assert pairs["prompt"] == [short[0]] and c["pairs"] == 1
    # SFT: prompt + response <= P + R keeps rows 1 and 4 (their first correct is `ok`)
    assert sft["problem"] == [short[0], short[2]] and c["sft_too_long"] == 2
    assert stats["lengths"]["prompt"]["max"] == P and stats["lengths"]["chosen"]["max"] == R
    assert stats["lengths"]["sft_prompt"]["max"] == P and stats["lengths"]["sft_response"]["max"] == R


def test_decontamination_catches_reworded_math500(tmp_path):
    core = ("If  $f( x )=\\dfrac{3x - 2}{x - 2}$ ,\nwhat is the value of "
            "$f(-2)\\,+\\,f(-1)\\!+f(0)$?   Express your answer as a\n common fraction.")
    original = next(p for i, p in decontam.load_eval_problems(["math500"]) if i == f"math500:{MATH500_ID}")
    assert decontam.tokens(core) == decontam.tokens(original)  # whitespace and LaTeX spacing normalised away
    strict = decontam.NgramIndex.build(decontam.load_eval_problems(["math500"]), n=13, threshold=1.0)
    assert strict.match(core) == [f"math500:{MATH500_ID}"]
    reworded = "Problem 3 (5 points).  " + core
    other = "A bag holds 7 red and 5 blue marbles. If two are drawn without replacement, what is the chance both are red?"
    rows = [{"problem": p, "answer": "1", "generations": ["g1", "g2"], "correctness_math_verify": [True, False]}
            for p in (reworded, other)]
    stats, sft, _ = _run(tmp_path, rows, decontam=True)
    assert stats["counts"]["contaminated"] == 1
    assert stats["decontamination"]["matched_eval_ids"] == [f"math500:{MATH500_ID}"]
    assert sft["problem"] == [other]
    stats, sft, _ = _run(tmp_path, rows, name="off", decontam=False)
    assert stats["counts"]["contaminated"] == 0 and len(sft) == 2


def test_deterministic_bytes_and_num_proc(tmp_path):
    rows = [_raw(i, [f"{i}a", f"{i}b", f"{i}c"], [i % 3 > 0, True, False], [True, i % 2 == 0, False],
                 source=["olympiads", "amc_aime", "aops_forum"][i % 3]) for i in range(40)]
    src = _write(tmp_path / "in.jsonl", rows)
    outs = []
    for name, num_proc in (("a", 1), ("b", 1), ("c", 2)):
        prepare(PrepareOptions(source=src, out=str(tmp_path / name), num_proc=num_proc, decontam=False, quiet=True))
        files = sorted(glob(str(tmp_path / name / "*" / "*.arrow"))) + [str(tmp_path / name / "stats.json")]
        outs.append([open(f, "rb").read() for f in files])
    assert len(outs[0]) == 3 and outs[0] == outs[1] == outs[2]
    assert len(load_from_disk(str(tmp_path / "a" / "pairs"))) > 10


def test_bad_rows_are_reported_by_reason(tmp_path):
    good = {"problem": "p", "answer": "1", "generations": ["a", "b"], "correctness_math_verify": [True, False]}
    bad_rows = [
        {"answer": "1", "generations": ["a"]},  # missing_problem
        good | {"problem": 3},  # non_string_problem
        good | {"problem": "  "},  # empty_problem
        {"problem": "q", "answer": "1"},  # missing_generations (then the layout is still openr1)
        good | {"generations": "a"},  # generations_not_a_list
        good | {"generations": [], "correctness_math_verify": []},  # empty_generations
        good | {"generations": [" ", ""]},  # empty_generations (all blank)
        good | {"generations": ["a", 7]},  # non_string_text
        good | {"correctness_math_verify": [True]},  # parallel_length_mismatch
        good | {"finish_reasons": ["stop"]},  # parallel_length_mismatch
        good | {"correctness_math_verify": "yes"},  # malformed_correctness_flags
    ]
    stats, sft, pairs = _run(tmp_path, [good] + bad_rows, extra_lines=["{not json", "[1, 2]"], seed=-1)
    assert stats["bad_rows"]["by_reason"] == {
        "empty_generations": 2, "empty_problem": 1, "generations_not_a_list": 1, "invalid_json": 1,
        "malformed_correctness_flags": 1, "missing_generations": 1, "missing_problem": 1, "non_string_problem": 1,
        "non_string_text": 1, "not_an_object": 1, "parallel_length_mismatch": 2}
    assert stats["counts"]["bad_rows"] == 13 and stats["counts"]["input_rows"] == 14
    assert stats["bad_rows"]["examples"]["invalid_json"] == ["out.jsonl:13"]
    assert stats["bad_rows"]["examples"]["parallel_length_mismatch"] == ["out.jsonl:10", "out.jsonl:11"]
    assert len(sft) == 1 and len(pairs) == 1


def _good(layout, i):
    """A usable row (with flags: no grading) of either layout."""
    if layout == "plain":
        return {"problem": f"Problem {i}", "answer": "1", "response": f"{i}a", "correctness_math_verify": True}
    return {"problem": f"Problem {i}", "answer": "1", "generations": [f"{i}a", f"{i}b"],
            "correctness_math_verify": [True, False]}


def _all_strings(ds) -> list:
    return [v for col in ds.column_names for v in ds[col] if isinstance(v, str)]


@pytest.mark.parametrize("layout", ["openr1", "plain"])
def test_invalid_utf8_line_is_a_counted_bad_row(tmp_path, layout):
    # a Latin-1 "é" (0xE9) in the middle of the file: never decoded with U+FFFD replacements
    latin1 = json.dumps(_good(layout, 2) | {"problem": "caf\u00e9 problem"}).replace("\\u00e9", "\xe9")
    assert latin1.count("\xe9") == 1
    lines = [latin1.encode("latin-1"), b"\xff\xfe not even close", json.dumps(_good(layout, 3))]
    stats, sft, pairs = _run(tmp_path, [_good(layout, 1)], extra_lines=lines, seed=-1)
    c = stats["counts"]
    assert (c["input_rows"], c["bad_rows"]) == (4, 2)
    assert stats["bad_rows"]["by_reason"] == {"invalid_utf8": 2}
    assert stats["bad_rows"]["examples"] == {"invalid_utf8": ["out.jsonl:2", "out.jsonl:3"]}
    assert sft["problem"] == ["Problem 1", "Problem 3"] and sft["response"] == ["1a", "3a"]
    assert not any("\ufffd" in v for d in (sft, pairs) for v in _all_strings(d))
    assert stats["input"]["layout"] == layout


@pytest.mark.parametrize("layout", ["openr1", "plain"])
def test_duplicate_json_key_is_a_counted_bad_row(tmp_path, layout):
    def with_tail(row, tail):  # the row's JSON with raw text appended inside its top-level object
        return json.dumps(row)[:-1] + ", " + tail + "}"

    lines = [
        with_tail(_good(layout, 2), '"problem": "Problem 2 again"'),  # top level (json.loads: last wins)
        with_tail(_good(layout, 3), '"meta": {"k": 1, "k": 1}'),  # nested, even with equal values
        with_tail(_good(layout, 4), '"meta": [{"x": {"deep": 1, "deep": 2}}]'),  # deeper, inside a list
        with_tail(_good(layout, 5), '"meta": {"a": {"k": 1}, "b": {"k": 2}}'),  # same key in two objects: fine
    ]
    stats, sft, _ = _run(tmp_path, [_good(layout, 1)], extra_lines=lines, seed=-1)
    assert (stats["counts"]["input_rows"], stats["counts"]["bad_rows"]) == (5, 3)
    assert stats["bad_rows"]["by_reason"] == {"duplicate_key": 3}
    assert stats["bad_rows"]["examples"] == {"duplicate_key": ["out.jsonl:2", "out.jsonl:3", "out.jsonl:4"]}
    assert sft["problem"] == ["Problem 1", "Problem 5"]


def test_parse_line_reasons():
    assert layouts.parse_line('{"a": {"b": [1, {"c": 2}]}, "c": 3}') == {"a": {"b": [1, {"c": 2}]}, "c": 3}
    assert layouts.parse_line('{"a": 1, "a": 2}') == layouts.Bad("duplicate_key")
    assert layouts.parse_line('{"a": [{"b": 1, "b": 1}]}') == layouts.Bad("duplicate_key")
    assert layouts.parse_line('{"a": 1,') == layouts.Bad("invalid_json")
    assert layouts.parse_line('[{"a": 1, "a": 2}]') == layouts.Bad("duplicate_key")
    assert layouts.parse_line("[1]") == layouts.Bad("not_an_object")


@pytest.mark.parametrize("num_proc", [1, 2])
def test_grader_that_cannot_run_is_a_one_line_prepare_error(tmp_path, monkeypatch, num_proc):
    from redi_ds.eval import GradeError

    def broken_grade(response, gold):
        raise GradeError("math-verify is not installed\n(pip install math-verify)")

    monkeypatch.setattr(prepare_map, "_GRADER", [broken_grade])
    rows = [{"problem": f"P{i}", "answer": "1", "response": "x"} for i in range(4)]  # no flags: graded
    src = _write(tmp_path / "in.jsonl", rows)
    with pytest.raises(PrepareError) as err:
        prepare(PrepareOptions(source=src, out=str(tmp_path / "o"), decontam=False, quiet=True, num_proc=num_proc))
    assert str(err.value) == "grading failed: math-verify is not installed (pip install math-verify)"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not os.path.exists(tmp_path / "o")


def test_plain_rows_graded_when_flags_missing(tmp_path, monkeypatch):
    calls = []

    def fake_grade(response, gold):
        calls.append((response, gold))
        return response.endswith(f"={gold}")

    monkeypatch.setattr(prepare_map, "_GRADER", [fake_grade])
    rows = [  # reward-kit trace layout (user_prompt / regenerated_content), renamed on the way in
        {"user_prompt": "A", "answer": "1", "regenerated_content": "x=2"},
        {"user_prompt": "B", "answer": "5", "regenerated_content": "x=5"},
        {"user_prompt": "A", "answer": "1", "regenerated_content": "x=1"},
        {"user_prompt": "B", "answer": "5", "regenerated_content": "x=4", "correctness_math_verify": True},
        {"user_prompt": "A", "answer": "1", "regenerated_content": "y=1"},
    ]
    stats, sft, pairs = _run(tmp_path, rows, seed=-1, renames=(("user_prompt", "problem"),
                                                                ("regenerated_content", "response")))
    assert sorted(calls) == sorted([("x=2", "1"), ("x=5", "5"), ("x=1", "1"), ("y=1", "1")])
    assert stats["input"]["layout"] == "plain" and stats["generations"]["graded"] == 4
    assert stats["generations"]["correctness_from"] == {"mixed": 1, "grader": 1}
    assert sft["problem"] == ["A", "B"] and sft["response"] == ["x=1", "x=5"]
    assert list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])) == [("A", "x=1", "x=2")]


def test_real_grader_call(tmp_path):
    monkeypatched = prepare_map._GRADER[:]
    prepare_map._GRADER.clear()
    try:
        grade = prepare_map.get_grader()
        assert grade("so $x = \\boxed{\\frac{1}{2}}$", "0.5") is True
        assert grade("so $x = \\boxed{3}$", "\\frac12") is False
    finally:
        prepare_map._GRADER[:] = monkeypatched


def test_cli_error_for_malformed_source(tmp_path, capsys):
    bad = tmp_path / "broken.jsonl"
    bad.write_text("this is not json\n{\"problem\": \n")
    proc = subprocess.run([sys.executable, "-m", "redi_ds.data.prepare", "--source", str(bad), "--out",
                           str(tmp_path / "o"), "--num-proc", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "broken.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # every row parses but none is usable: also an error, counted by reason
    src = _write(tmp_path / "objs.jsonl", [{"problem": 1, "generations": ["a"]}, {"problem": "p", "generations": []}])
    assert main(["--source", src, "--out", str(tmp_path / "o2"), "--num-proc", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "objs.jsonl" in err and "non_string_problem 1" in err
    assert not os.path.exists(tmp_path / "o2")  # no partial output, no work folder left behind
    src = _write(tmp_path / "plain.jsonl", [{"problem": "a", "response": 5}, {"problem": "", "response": "x"}])
    assert main(["--source", src, "--out", str(tmp_path / "o3"), "--num-proc", "1", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: {src}: no usable rows: all 2 rows are malformed "
                                       "(empty_problem 1, non_string_text 1)\n")
