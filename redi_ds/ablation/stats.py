"""Paired, hierarchical statistics over the same held-out problems, and the preregistered verdict rules.

Every model is scored on the same N problems. A branch is trained from B independently trained bases with S
seeds each, so a difference between two branches (or a branch and its base) is paired problem by problem:

    d[b, s, i] = x[b, s, i] - y[b, s, i]          (y: the other branch's run with the same base and seed, or
                                                    the base itself)
    value      = mean_{b, s, i} d
    problems   v1 = sd_i( mean_{b, s} d[b, s, i] )^2 / N                 df1 = N - 1
    training   v2 = sd_b( mean_{s, i} d[b, s, i] )^2 / B                 df2 = B - 1   (B >= 2)
                  = sd_s( mean_i d[0, s, i] )^2 / S                      df2 = S - 1   (B = 1, S >= 2)
    se         = sqrt(v1 + v2),   df = (v1 + v2)^2 / (v1^2 / df1 + v2^2 / df2)    (Welch-Satterthwaite)

The base-level term carries the seed noise too (a base's mean over its S seeds varies by sigma_base^2 +
sigma_seed^2 / S), so two bases give one degree of freedom for training noise: when it dominates, the t
threshold is large (12.7 at df 1), as it should be.

The rules (``Rules``; their values are in the ablation config, committed before the run):

    tie           the (1 - 2 alpha) interval lies inside (-margin, +margin)         (two one-sided tests)
    supported     otherwise, the (1 - alpha) two-sided interval lies above 0
    contradicted  otherwise, it lies below 0
    inconclusive  otherwise, and always with one base and one seed (B = S = 1: the training noise is not
                  estimated, so the interval would be the problems' alone)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VERDICTS = ("supported", "contradicted", "tie", "inconclusive")


@dataclass(frozen=True)
class Rules:
    alpha: float = 0.05  # two-sided level of "supported" / "contradicted"
    margin: float = 0.02  # equivalence margin (accuracy, a fraction): within it, a tie
    collapse_nats: float = 0.1  # claim 2: a held-out log-prob per token that falls by more than this has moved


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def sd(xs) -> float:
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ----------------------------------------------------------------------------- Student's t


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (the regularized incomplete beta function)."""
    if math.isinf(df):
        return 0.5 * (1 + math.erf(t / math.sqrt(2)))
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (bisection; 1e-10)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (Numerical Recipes' betacf)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1 + num / c if abs(1 + num / c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return front * h / a


# ----------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    value: float
    se: float
    df: float
    per_base: list  # mean over seeds and problems, per base
    per_seed: list  # [[value per seed] per base]

    @property
    def one_run(self) -> bool:
        """One base and one seed: the training noise is not estimated, so no verdict can be drawn."""
        return len(self.per_seed) == 1 and len(self.per_seed[0]) == 1

    def interval(self, level: float) -> tuple[float, float]:
        if self.se == 0:
            return self.value, self.value
        t = t_quantile(0.5 + level / 2, self.df)
        return self.value - t * self.se, self.value + t * self.se

    def verdict(self, rules: Rules) -> str:
        if self.one_run:
            return "inconclusive"
        lo90, hi90 = self.interval(1 - 2 * rules.alpha)
        if -rules.margin < lo90 and hi90 < rules.margin:
            return "tie"
        lo, hi = self.interval(1 - rules.alpha)
        return "supported" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"

    def words(self, rules: Rules) -> str:
        lo, hi = self.interval(1 - rules.alpha)
        seeds = sum(len(s) for s in self.per_seed)
        return (f"{pct(self.value)} points, {100 * (1 - rules.alpha):g}% interval [{pct(lo)}, {pct(hi)}] "
                f"(SE {100 * self.se:.1f}, df {self.df:.1f}; {len(self.per_base)} base(s), {seeds} run(s))"
                + ("; one run: the training noise is not estimated (the interval is the problems' alone), so no "
                   "verdict" if self.one_run else ""))


def estimate(diffs: list[list[list[float]]]) -> Estimate:
    """``diffs[b][s][i]``: per base, per seed, per problem (a difference, or a score against 0)."""
    B, S, N = len(diffs), len(diffs[0]), len(diffs[0][0])
    per_seed = [[mean(row) for row in base] for base in diffs]
    per_base = [mean(s) for s in per_seed]
    by_problem = [mean(diffs[b][s][i] for b in range(B) for s in range(S)) for i in range(N)]
    v1, df1 = sd(by_problem) ** 2 / N, max(N - 1, 1)
    if B >= 2:
        v2, df2 = sd(per_base) ** 2 / B, B - 1
    elif S >= 2:
        v2, df2 = sd(per_seed[0]) ** 2 / S, S - 1
    else:
        v2, df2 = 0.0, 1
    var = v1 + v2
    denom = (v1 ** 2 / df1 if v1 else 0.0) + (v2 ** 2 / df2 if v2 else 0.0)
    df = var ** 2 / denom if denom > 0 else math.inf
    return Estimate(mean(per_base), math.sqrt(var), df, per_base, per_seed)


def paired(a: list[list[list[float]]], b: list[list[list[float]]]) -> Estimate:
    """a - b, problem by problem; ``b[base]`` may hold one row (the base model) or one per seed."""
    return estimate([[[x - y for x, y in zip(ra, b[k][s if len(b[k]) > 1 else 0])] for s, ra in enumerate(base)]
                     for k, base in enumerate(a)])


def pct(x: float) -> str:
    return f"{100 * x:+.1f}" if x == x else "n/a"


# ----------------------------------------------------------------------------- the verdicts


def combine(verdicts: list[str]) -> str:
    """A claim against several branches: supported only if supported against each; contradicted if against any;
    a tie if every comparison ties; otherwise inconclusive."""
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    if "contradicted" in verdicts:
        return "contradicted"
    if verdicts and all(v == "tie" for v in verdicts):
        return "tie"
    return "inconclusive"


def stability(by_lr: dict[str, dict[str, dict]], rules: Rules, high: str = "redi-1.0", low: str = "redi-0.8"
              ) -> tuple[str, str]:
    """Claim 2 from held-out curves at equal learning rates, per probe kind.

    ``by_lr[lr][branch] = {kind: {"chosen": [(step, v)], "rejected": [...]}}`` (nats per token). At one LR and
    kind, "supported" when alpha 1.0's chosen log-prob falls by more than ``collapse_nats`` and by more than
    twice alpha 0.8's, while alpha 0.8's falls by less than ``collapse_nats``. The claim is supported when some LR
    supports it in every kind; "not shown" when no LR does; "not tested" without both curves at one LR."""
    def fall(c: dict, which: str) -> float:
        return c[which][0][1] - c[which][-1][1]

    shared = {lr: (c[high], c[low]) for lr, c in by_lr.items() if high in c and low in c}
    if not shared:
        return "not tested", f"this run has no {high} and {low} held-out curves at a common learning rate."
    parts, hits = [], []
    for lr, (a, b) in shared.items():
        ok = []
        for kind in a:
            if kind not in b or not a[kind]["chosen"] or not b[kind]["chosen"]:
                continue
            fa, fb = fall(a[kind], "chosen"), fall(b[kind], "chosen")
            ok.append(fa > rules.collapse_nats and fa > 2 * max(fb, 0.0) and fb < rules.collapse_nats)
            parts.append(f"LR {lr}, {kind}: {fa:.3f} vs {fb:.3f} (rejected {fall(a[kind], 'rejected'):.3f} vs "
                         f"{fall(b[kind], 'rejected'):.3f})")
        hits.append(bool(ok) and all(ok))
    how = f"held-out chosen log-prob per token fell by ({high} vs {low}, nats) " + "; ".join(parts)
    if any(hits):
        return "supported", f"this run supports it: {how}."
    return "not shown", f"this run does not show it: {how}."
