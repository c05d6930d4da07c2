"""Paired statistics over the same held-out problems, and the verdicts on the paper's claims.

Every branch is scored on the same problems as the base, for each seed, so differences are paired:

    x[s, i] in {0, 1}: branch, seed s, problem i          b[i]: the base (one SFT model)
    accuracy_s = mean_i x[s, i]                             se_s = sqrt(acc_s (1 - acc_s) / N)
    delta_s    = mean_i (x[s, i] - b[i])                    delta_se_s = sd_i(x[s, i] - b[i]) / sqrt(N)
    over seeds: accuracy = mean_s accuracy_s; delta = mean_s delta_s;
        se (and delta_se) = sqrt( sd_i(mean_s d[s, i])^2 / N  +  sd_s(delta_s)^2 / S )

the first term is the noise of the held-out sample (problems, paired), the second the noise of training
(seeds); with one seed only the first remains. Two branches are compared the same way, seed by seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SIGNIFICANT = 2.0  # a difference counts when it exceeds this many standard errors
COLLAPSE_NATS = 0.1  # a held-out log-prob per token that falls by more than this has moved


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs) -> float:
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class Paired:
    value: float      # mean over seeds
    se: float         # problems and seeds combined (module doc)
    per_seed: list    # [(value_s, se_s)]

    def significant(self) -> int:
        """+1 / -1 when the value is more than SIGNIFICANT standard errors above / below 0, else 0."""
        if self.se == 0:
            return (self.value > 0) - (self.value < 0)
        z = self.value / self.se
        return 1 if z > SIGNIFICANT else -1 if z < -SIGNIFICANT else 0


def paired(a: list[list[float]], b: list[list[float]]) -> Paired:
    """Mean difference a - b over problems, seed by seed (``a[s][i]``; ``b`` has one row, the base, or as many as a)."""
    seeds = len(a)
    rows = b if len(b) == seeds else [b[0]] * seeds
    n = len(a[0])
    diffs = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, rows)]
    per_seed = [(_mean(d), _sd(d) / math.sqrt(n)) for d in diffs]
    averaged = [_mean(diffs[s][i] for s in range(seeds)) for i in range(n)]
    se = math.sqrt(_sd(averaged) ** 2 / n + (_sd(v for v, _ in per_seed) ** 2 / seeds if seeds > 1 else 0.0))
    return Paired(_mean(v for v, _ in per_seed), se, per_seed)


def accuracy(a: list[list[float]]) -> Paired:
    """Accuracy over seeds with its standard error (binomial per seed; problems and seeds combined)."""
    n = len(a[0])
    per_seed = [(_mean(r), math.sqrt(max(_mean(r) * (1 - _mean(r)), 0.0) / n)) for r in a]
    averaged = [_mean(a[s][i] for s in range(len(a))) for i in range(n)]
    seeds = len(a)
    se = math.sqrt(_sd(averaged) ** 2 / n + (_sd(v for v, _ in per_seed) ** 2 / seeds if seeds > 1 else 0.0))
    return Paired(_mean(v for v, _ in per_seed), se, per_seed)


def pct(x: float) -> str:
    return f"{100 * x:+.1f}" if x == x else "n/a"


# ----------------------------------------------------------------------------- the claims


def claim_beats(name: str, other: str, diff: Paired) -> tuple[str, str]:
    """(verdict, sentence) for "branch `name` beats branch `other`" from their paired difference."""
    s = diff.significant()
    verdict = {1: "supported", -1: "contradicted", 0: "inconclusive"}[s]
    how = (f"{name} minus {other}: {pct(diff.value)} points (SE {100 * diff.se:.1f}, "
           f"{len(diff.per_seed)} seed{'s' if len(diff.per_seed) > 1 else ''})")
    text = {1: f"this run supports it: {name} is better than {other} by more than {SIGNIFICANT:g} SE; {how}.",
            -1: f"this run contradicts it: {name} is worse than {other} by more than {SIGNIFICANT:g} SE; {how}.",
            0: f"this run does not show it: the difference is within {SIGNIFICANT:g} SE; {how}."}[s]
    return verdict, text


def claim_stability(by_lr: dict[str, dict[str, dict]]) -> tuple[str, str]:
    """Symmetric REDI (alpha 1.0) collapses the held-out chosen log-prob; alpha 0.8 holds it.

    ``by_lr[lr][name] = {"chosen": [(step, value)], "rejected": [...]}`` (nats per token): redi-1.0 and
    redi-0.8 trained at the same learning rate (the sweep's runs, or the branches' when their LRs agree), so
    the comparison is not confounded by the step size. Supported when at some LR alpha 1.0's chosen log-prob
    falls by more than COLLAPSE_NATS and by more than twice alpha 0.8's fall, while alpha 0.8's falls by less
    than COLLAPSE_NATS; partly when alpha 1.0's falls further than 0.8's at every LR."""
    def fall(c: dict, which: str = "chosen") -> float:
        return c[which][0][1] - c[which][-1][1]

    pairs = {lr: (c["redi-1.0"], c["redi-0.8"]) for lr, c in by_lr.items()
             if "redi-1.0" in c and "redi-0.8" in c and c["redi-1.0"]["chosen"] and c["redi-0.8"]["chosen"]}
    if not pairs:
        return "not tested", "this run has no redi-1.0 and redi-0.8 held-out curves at a common learning rate."
    falls = {lr: (fall(a), fall(b)) for lr, (a, b) in pairs.items()}
    parts = [f"LR {lr}: {falls[lr][0]:.3f} vs {falls[lr][1]:.3f} (rejected {fall(a, 'rejected'):.3f} vs "
             f"{fall(b, 'rejected'):.3f})" for lr, (a, b) in pairs.items()]
    how = "; ".join(parts)
    how = f"held-out chosen log-prob per token fell by (alpha 1.0 vs 0.8, nats) {how}"
    if any(f10 > COLLAPSE_NATS and f10 > 2 * max(f08, 0.0) and f08 < COLLAPSE_NATS for f10, f08 in falls.values()):
        return "supported", f"this run supports it: {how}."
    if all(f10 <= COLLAPSE_NATS for f10, _ in falls.values()):
        return "not shown", f"this run does not show a collapse: {how}."
    if all(f10 > f08 for f10, f08 in falls.values()):
        return "partly", f"this run shows alpha 1.0 falling further at every LR, but alpha 0.8 falling too: {how}."
    return "not shown", f"this run does not show alpha 1.0 falling further than 0.8: {how}."


def claim_baselines(deltas: dict[str, Paired], lrs: dict[str, float], redi: str = "redi-0.8") -> tuple[str, str]:
    """DPO and SimPO degrade (significantly below the base) or need a much (10x) smaller LR than REDI."""
    parts, hits, tested = [], 0, 0
    for name in ("dpo", "simpo"):
        if name not in deltas:
            continue
        tested += 1
        d = deltas[name]
        degrade = d.significant() < 0
        smaller = redi in lrs and name in lrs and lrs[name] * 10 <= lrs[redi]
        hits += int(degrade or smaller)
        lr_note = f", chosen LR {lrs[name]:g} vs {lrs[redi]:g} for {redi}" if name in lrs and redi in lrs else ""
        parts.append(f"{name} {pct(d.value)} points vs the base (SE {100 * d.se:.1f}){lr_note}"
                     f" -> {'degrades' if degrade else 'needs a 10x smaller LR' if smaller else 'neither'}")
    if not tested:
        return "not tested", "this run has no dpo or simpo branch."
    verdict = "supported" if hits == tested else "partly" if hits else "not shown"
    lead = {"supported": "this run supports it", "partly": "this run supports it in part",
            "not shown": "this run does not show it"}[verdict]
    return verdict, f"{lead}: " + "; ".join(parts) + "."
