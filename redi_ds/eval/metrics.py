"""Accuracy statistics over k samples per problem (pure Python, no numpy needed).

Notation: a benchmark has problems i = 1..N, each sampled k times; ``c[i][j]`` is 1 when sample j of
problem i is correct.

- **pass@1 (averaged over k samples)**: ``mean_i (1/k) sum_j c[i][j]``, the mean over problems of the
  fraction of correct samples (the paper's "pass@1 over 16 samples").
- **standard error of pass@1**: the k *per-sample scores* are ``s_j = mean_i c[i][j]`` (the accuracy of
  the run made of sample j of every problem; pass@1 is their mean). The standard error is
  ``std(s_1..s_k) / sqrt(k)`` with the sample standard deviation (``ddof=1``, divisor k-1). It
  measures the sampling noise of the k runs, not the noise of the choice of problems. It is None for
  k = 1.
- **pass@k** (unbiased estimator of Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code"): per problem with n samples of which c are correct, ``1 - C(n-c, k) / C(n, k)``, averaged over
  problems; computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def pass1_stderr(correct: Sequence[Sequence[bool]], ddof: int = 1) -> Optional[float]:
    """Standard error of pass@1 from the per-sample scores (see the module docstring).

    ``correct[i][j]``: sample j of problem i. All problems must have the same number k of samples.
    """
    if not correct:
        return None
    k = len(correct[0])
    if any(len(row) != k for row in correct):
        raise ValueError("every problem needs the same number of samples")
    if k - ddof <= 0:
        return None
    scores = [sum(bool(row[j]) for row in correct) / len(correct) for j in range(k)]
    mean = sum(scores) / k
    var = sum((s - mean) ** 2 for s in scores) / (k - ddof)
    return math.sqrt(var) / math.sqrt(k)


def accuracy_stats(correct: Sequence[Sequence[bool]], lengths: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """pass@1, its standard error, pass@k and the mean response length for one group of problems."""
    n_problems = len(correct)
    if n_problems == 0:
        return {"num_problems": 0}
    k = len(correct[0])
    out = {
        "num_problems": n_problems,
        "samples": k,
        "pass@1": sum(sum(map(bool, row)) / k for row in correct) / n_problems,
        "pass@1_stderr": pass1_stderr(correct),
        "pass@k": {str(kk): sum(pass_at_k(k, sum(map(bool, row)), kk) for row in correct) / n_problems
                   for kk in ks_for(k)},
    }
    if lengths is not None:
        flat = [int(x) for row in lengths for x in row]
        out["mean_response_tokens"] = sum(flat) / len(flat) if flat else 0.0
    return out


def summarize_benchmark(problems: Sequence[Mapping], samples: Iterable[Mapping]) -> dict:
    """Summary of one benchmark from its problems (``id``, ``subject``, ``level``) and sample rows
    (``problem_id``, ``sample_index``, ``correct``, ``num_tokens``, ``finish_reason``, ``extracted_answer``).

    Adds ``by_subject`` / ``by_level`` where the problems have them, the fraction of samples cut at the
    token limit (``truncated_fraction``) and without a boxed answer (``no_answer_fraction``).
    """
    by_problem: dict[str, dict[int, Mapping]] = defaultdict(dict)
    for s in samples:
        by_problem[str(s["problem_id"])][int(s["sample_index"])] = s
    ids = [str(p["id"]) for p in problems]
    k = max((len(v) for v in by_problem.values()), default=0)
    missing = [i for i in ids if len(by_problem.get(i, {})) != k]
    if missing:
        raise ValueError(f"{len(missing)} problems lack samples (e.g. {missing[0]!r}); expected {k} each")
    rows = {i: [by_problem[i][j] for j in sorted(by_problem[i])] for i in ids}
    correct = {i: [bool(s["correct"]) for s in rows[i]] for i in ids}
    lengths = {i: [int(s["num_tokens"]) for s in rows[i]] for i in ids}
    out = accuracy_stats([correct[i] for i in ids], [lengths[i] for i in ids])
    flat = [s for i in ids for s in rows[i]]
    out["truncated_fraction"] = sum(s.get("finish_reason") == "length" for s in flat) / len(flat)
    out["no_answer_fraction"] = sum(s.get("extracted_answer") is None for s in flat) / len(flat)
    for field, key in (("subject", "by_subject"), ("level", "by_level")):
        groups: dict[str, list[str]] = defaultdict(list)
        for p in problems:
            if p.get(field) is not None:
                groups[str(p[field])].append(str(p["id"]))
        if groups:
            out[key] = {
                g: accuracy_stats([correct[i] for i in members], [lengths[i] for i in members])
                for g, members in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))
            }
    return out


def _sort_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)
