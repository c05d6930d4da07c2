"""A procedural teacher: short multi-step arithmetic problems with step-by-step traces.

For each problem it writes a correct trace and a flawed one: the flawed trace makes one planted slip in
one step (an arithmetic error of a small offset) and carries the wrong value through the remaining
steps to a wrong ``\\boxed{}`` answer. Deterministic by seed, so the embedded default run trains SFT on
the positives and REDI on real (correct, incorrect) pairs, and the flaw is checkable: the rejected
answer differs from the gold one, and exactly one step's arithmetic is wrong.

    python -m redi_ds.data.synthetic --out DIR [--n 256 --seed 0]   # writes sft.jsonl and pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}


def make_problem(rng: random.Random) -> dict:
    """One problem: a start value and 2-4 operations; returns the problem, both traces and both answers."""
    start = rng.randint(2, 20)
    steps = [(rng.choice("+-*"), rng.randint(2, 9)) for _ in range(rng.randint(2, 4))]
    text = f"Start with {start}. " + " Then ".join(f"{_WORDS[op]} {b}." for op, b in steps)
    problem = f"{text} What is the result?"
    slip_at = rng.randrange(len(steps))
    slip = rng.choice([-2, -1, 1, 2])

    def trace(with_slip: bool) -> tuple[str, int]:
        value, lines = start, [f"We start with {start}."]
        for i, (op, b) in enumerate(steps):
            new = _OPS[op](value, b)
            if with_slip and i == slip_at:
                new += slip
            lines.append(f"Step {i + 1}: {value} {op} {b} = {new}.")
            value = new
        lines.append(f"The final answer is $\\boxed{{{value}}}$.")
        return "\n".join(lines), value

    chosen, answer = trace(False)
    rejected, wrong = trace(True)
    return {"problem": problem, "answer": str(answer), "chosen": chosen, "rejected": rejected,
            "rejected_answer": str(wrong), "slip_step": slip_at + 1}


def generate(n: int = 256, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def sft_rows(problems: list[dict]) -> list[dict]:
    return [{"problem": p["problem"], "response": p["chosen"], "answer": p["answer"]} for p in problems]


def pair_rows(problems: list[dict]) -> list[dict]:
    return [{"prompt": p["problem"], "chosen": p["chosen"], "rejected": p["rejected"], "answer": p["answer"]}
            for p in problems]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate(a.n, a.seed)
    for name, rows in (("sft.jsonl", sft_rows(problems)), ("pairs.jsonl", pair_rows(problems))):
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(problems)} problems to {out}/sft.jsonl and {out}/pairs.jsonl")


if __name__ == "__main__":
    main()
