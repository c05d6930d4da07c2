"""pass@k, the standard error of pass@1 and benchmark summaries, against hand-computed numbers."""

import math

import pytest

from redi_ds.eval.metrics import accuracy_stats, ks_for, pass1_stderr, pass_at_k, summarize_benchmark


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 0, 1, 0.0),
    (4, 1, 1, 0.25),
    (4, 3, 1, 0.75),
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (4, 3, 2, 1.0),  # n - c < k
    (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (16, 4, 4, 1 - 495 / 1820),  # 1 - C(12,4)/C(16,4)
    (16, 16, 16, 1.0),
    (16, 0, 16, 0.0),
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(16) == [1, 2, 4, 8, 16]
    assert ks_for(6) == [1, 2, 4, 6]


# three problems x four samples
CORRECT = [[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_stderr_hand_computed():
    # per-sample scores s_j = (2/3, 1/3, 0, 1/3); mean 1/3; deviations (1/3, 0, -1/3, 0)
    # sample variance = (2/9) / 3 = 2/27; stderr = sqrt(2/27) / sqrt(4)
    assert pass1_stderr(CORRECT) == pytest.approx(math.sqrt(2 / 27) / 2)
    assert pass1_stderr(CORRECT, ddof=0) == pytest.approx(math.sqrt(2 / 36) / 2)
    assert pass1_stderr([[1], [0]]) is None  # k = 1
    assert pass1_stderr([[1, 1], [0, 0]]) == 0.0  # every run scores 1/2
    with pytest.raises(ValueError):
        pass1_stderr([[1, 0], [1]])


def test_accuracy_stats_hand_computed():
    s = accuracy_stats(CORRECT, [[10, 20, 30, 40], [5, 5, 5, 5], [1, 2, 3, 4]])
    assert s["num_problems"] == 3 and s["samples"] == 4
    assert s["pass@1"] == pytest.approx((3 / 4 + 0 + 1 / 4) / 3)
    assert s["pass@k"]["2"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert s["pass@k"]["4"] == pytest.approx(2 / 3)
    assert s["mean_response_tokens"] == pytest.approx(130 / 12)


def test_summarize_benchmark_groups():
    problems = [{"id": "a", "subject": "Algebra", "level": 1}, {"id": "b", "subject": "Algebra", "level": 2},
                {"id": "c", "subject": "Geometry", "level": 2}]
    samples = []
    for pid, row in zip("abc", CORRECT):
        for j, ok in enumerate(row):
            samples.append({"problem_id": pid, "sample_index": j, "correct": bool(ok), "num_tokens": 8,
                            "finish_reason": "length" if pid == "b" else "stop",
                            "extracted_answer": None if pid == "b" else "1"})
    s = summarize_benchmark(problems, samples)
    assert s["pass@1"] == pytest.approx(1 / 3)
    assert s["truncated_fraction"] == pytest.approx(4 / 12)
    assert s["no_answer_fraction"] == pytest.approx(4 / 12)
    assert list(s["by_level"]) == ["1", "2"]
    assert s["by_level"]["1"]["pass@1"] == pytest.approx(0.75)
    assert s["by_level"]["2"]["pass@1"] == pytest.approx(0.125)
    assert s["by_subject"]["Algebra"]["pass@1"] == pytest.approx(0.375)
    assert s["by_subject"]["Geometry"]["num_problems"] == 1
    with pytest.raises(ValueError, match="lack samples"):
        summarize_benchmark(problems + [{"id": "d"}], samples)
