"""The grader: extraction, equivalence, bundled-set normalisations, timeouts, threads and processes."""

import json
import multiprocessing as mp
import threading

import pytest

from redi_ds.eval import grading
from redi_ds.eval import BENCHMARKS, extract_answer, grade, grade_many, load_benchmark

# (response, gold, expected)
CASES = [
    # plain and nested boxes
    (r"The answer is $\boxed{5}$.", "5", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", False),
    (r"so \fbox{42}", "42", True),
    (r"so the answer is $\boxed 7$.", "7", True),
    (r"\boxed {12}", "12", True),
    # several boxes: the last wins, a wrong answer in an earlier box does not matter
    (r"First try \boxed{3}. Wait, that is wrong; the answer is \boxed{4}.", "4", True),
    (r"\boxed{4} ... on reflection \boxed{3}", "4", False),
    (r"<think>maybe \boxed{2}</think> The answer is \boxed{6}.", "6", True),
    # unclosed boxes and no boxes
    (r"The answer is \boxed{5", "5", False),
    (r"I get \boxed{4} and then \boxed{5", "4", True),
    ("The answer is 5.", "5", False),
    (r"\boxed{}", "5", False),
    # bundled-set normalisations
    (r"\boxed{25}", "025", True),  # AIME leading zeros
    (r"\boxed{025}", "25", True),
    (r"\boxed{250}", "025", False),
    (r"\boxed{12345678901234567890123456789013}", "12345678901234567890123456789012", False),  # exact, no rounding
    (r"\boxed{27}", "27.0", True),  # AMC floats
    (r"\boxed{27.5}", "27.0", False),
    (r"\boxed{\frac{1}{2n+2}}", r"$\frac{1}{2 n+2}$", True),  # OlympiadBench $...$
    (r"\boxed{221, 8}", "$221,$8$", True),
    (r"\boxed{8.7 \times 10^{8}}", ["8.7 \\times 10^{8}", "870000000"], True),  # variant lists
    (r"\boxed{870000000}", ["8.7 \\times 10^{8}", "870000000"], True),
    (r"\boxed{9}", ["8.7 \\times 10^{8}", "870000000"], False),
    (r"\boxed{1.6}", ["1.6\n"], True),
    (r"\boxed{4.5 \times 10^{33}}", "4.5e33", True),  # Minerva e-notation
    (r"\boxed{4.6 \times 10^{33}}", "4.5e33", False),
    # math-verify forms
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),
    (r"\boxed{[1, 2)}", "[1,2)", True),
    (r"\boxed{(1,2]}", "[1,2)", False),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{(\frac{\pi}{2}, 3)}", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"\boxed{90^{\circ}}", r"90^\circ", True),
    (r"\boxed{90}", r"90^\circ", True),
    (r"\boxed{10 \text{ cm}}", "10", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{p-q}", "p - q", True),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", True),
    (r"\boxed{1,000}", "1000", True),
    # text answers
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
    (r"\boxed{Evelyn}", r"\text{Evelyn}", True),
    (r"\boxed{\text{Bob}}", r"\text{Evelyn}", False),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", True),
    # garbage never raises
    ("", "5", False),
    (None, "5", False),
    (12345, "5", False),
    (r"\boxed{5}", "", False),
    (r"\boxed{5}", None, False),
    (r"\boxed{5}", [], False),
    (r"\boxed{\frac{}", "5", False),
    (r"}}}{{{\boxed{{}}}\boxed", "5", False),
    ("\x00\udcff" + r"\boxed{\x00}", "5", False),
]


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_grade_table(response, gold, expected):
    assert grade(response, gold) is expected


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_math_verify_path_agrees(response, gold, expected):
    # the same verdicts without the canonical-string fast path
    assert grade(response, gold, fast_path=False) is expected


@pytest.mark.parametrize("response,expected", [
    (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
    (r"\boxed{1} \fbox{2}", "2"),
    (r"\boxed 5$ and more", "5"),
    (r"\boxed 5.", "5"),
    (r"\boxed{\boxed{3}}", "3"),
    (r"\boxed{4} \boxed{5", "4"),
    (r"\boxed{", None),
    ("no box", None),
    (r"\boxedx{3}", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extraction_is_linear_on_adversarial_input(monkeypatch):
    # 20k unclosed boxes: every candidate is scanned only up to the previous unclosed one
    scanned = []
    real = grading._match_brace

    def counting(s, open_pos, limit):
        scanned.append(limit - open_pos)
        return real(s, open_pos, limit)

    monkeypatch.setattr(grading, "_match_brace", counting)
    s = "\\boxed{" * 20_000 + "1"
    assert extract_answer(s) is None
    assert len(scanned) == 20_000 and sum(scanned) <= len(s)  # a naive rescan would be ~len(s) ** 2 / 14
    monkeypatch.undo()
    assert extract_answer("x" * 2_000_000 + "\\boxed{5}") == "5"
    assert grade("\\boxed{" * 200_000, "1") is False


@pytest.mark.parametrize("response", [
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{(10^{100})!}",
    r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    r"\boxed{" + "1" * 5000 + "}",
])
def test_pathological_answers_return_within_the_timeout(response):
    # bounded by the grader's own timeout: a hang would be killed after 3 s and graded False
    assert grade(response, "1", timeout=3) is False


def test_hard_deadline_kills_a_stuck_worker_and_recovers():
    before = dict(grading.STATS)
    # a worker answer that takes about 1 s (math-verify's own 1 s timeouts) against a 0.2 s deadline
    assert grade(r"\boxed{9^{9^{9^{9^{9}}}}}", "7", timeout=0.2) is False
    assert grading.STATS["timeouts"] == before["timeouts"] + 1
    # the next grade starts a fresh worker and works
    assert grade(r"\boxed{x^2+2x+1}", "(x+1)^2") is True
    assert grading.STATS["worker_starts"] >= before["worker_starts"] + 1


def test_grade_in_threads():
    results = {}

    def work(i):
        results[i] = grade(rf"\boxed{{\frac{{{i}}}{{2}}}}", f"{i / 2}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {i: True for i in range(1, 5)}


def _grade_in_child(args):
    return grade(*args), grading._local.worker.proc.pid


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_grade_in_daemonic_worker_processes(method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} start method")
    assert grade(r"\boxed{x+x}", "2x")  # the parent owns a worker now: a forked child must not share it
    parent_worker = grading._local.worker.proc.pid
    with mp.get_context(method).Pool(1) as pool:
        got = pool.map(_grade_in_child, [(r"\boxed{x+x}", "2x"), (r"\boxed{0.25}", r"\frac14"), (r"\boxed{3}", "4")])
    assert [ok for ok, _ in got] == [True, True, False]
    assert len({pid for _, pid in got}) == 1 and got[0][1] != parent_worker
    assert grade(r"\boxed{\frac{6}{4}}", "1.5") is True  # the parent's worker still works


def test_grade_many_matches_grade():
    responses = [r"\boxed{1}", r"\boxed{\frac{2}{4}}", "no box", r"\boxed{(1,2)}"]
    golds = ["1", "0.5", "1", "(2,1)"]
    assert grade_many(responses, golds, workers=2) == [True, True, False, False]


def _all_bundled_golds():
    """(benchmark, id, gold, variant) for every variant of every row of every bundled set, without the
    exact repeats (same variant and same gold; e.g. math500 vs rllm_math), which grade identically."""
    seen, out = set(), []
    for name in BENCHMARKS:
        for row in load_benchmark(name):
            for variant in grading.gold_variants(row["answer"]):
                key = (variant, json.dumps(row["answer"]))
                if key not in seen:
                    seen.add(key)
                    out.append((name, row["id"], row["answer"], variant))
    return out


def test_every_bundled_gold_grades_correct_against_itself():
    golds = _all_bundled_golds()
    assert len(golds) > 1500
    responses = [f"Reasoning... so the final answer is $\\boxed{{{v}}}$." for _, _, _, v in golds]
    answers = [a for _, _, a, _ in golds]
    # through math-verify (no string fast path), with a generous timeout for the heaviest expressions
    verdicts = grade_many(responses, answers, workers=2, timeout=60, fast_path=False)
    failures = [g[:2] + (g[3],) for g, ok in zip(golds, verdicts) if not ok]
    assert not failures, failures[:10]
    # and the public default (with the fast path)
    assert all(grade_many(responses, answers, workers=2))
