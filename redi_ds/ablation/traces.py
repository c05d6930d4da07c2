"""The ablation's stage-1 and stage-2 data from graded samples: the teacher's (the paper's setting) and the
base's own (this project's student-negative section).

    teacher samples on the sft problems     -> sft.jsonl: every distinct correct trace (stage 1)
    teacher samples on the stage-2 problems -> teacher_pairs.jsonl: (correct, wrong) of each problem that has
                                               both; stage2.jsonl: the same problems' correct traces
    teacher samples on the val problems     -> probe_pairs.jsonl: held-out pairs with their ``kind``
    base samples on the stage-2 pair problems -> student_pairs.jsonl (the teacher's correct trace against the
                                               base's wrong one), rft.jsonl (the base's correct samples plus
                                               the teacher's correct traces: rejection-sampling SFT)

Every problem is accounted for in ``stats.json``: how many samples were right, and why a problem was dropped.
A wrong sample with no text is never a negative (counted as ``empty``).
"""

from __future__ import annotations

import json
from pathlib import Path

from redi_ds.ablation.task import is_in_order, write_jsonl

Samples = list[tuple[str, bool, str]]  # (text, correct, finish_reason) per sample of one problem


def first(samples: Samples, correct: bool) -> str:
    """The first sample that is (in)correct and has text, or ''."""
    return next((t for t, ok, _ in samples if ok == correct and t.strip()), "")


def correct(samples: Samples) -> list[str]:
    """The distinct correct samples with text, in order."""
    return list(dict.fromkeys(t for t, ok, _ in samples if ok and t.strip()))


def probe_kind(prompt: str, chosen: str, rejected: str) -> str:
    """A held-out pair's kind for the claim-2 probe: whether the two traces start with the same step."""
    same = chosen.split("\n", 1)[0] == rejected.split("\n", 1)[0]
    return "same first step" if same else "different first step"


def counts(rows: list[dict], samples: list[Samples]) -> dict:
    n = sum(len(s) for s in samples)
    right = sum(ok for s in samples for _, ok, _ in s)
    return {"problems": len(rows), "samples": n, "correct": right, "accuracy": right / max(n, 1),
            "truncated": sum(f == "length" for s in samples for _, _, f in s),
            "empty_wrong": sum(not ok and not t.strip() for s in samples for t, ok, _ in s),
            "all_right": sum(all(ok for _, ok, _ in s) for s in samples),
            "all_wrong": sum(not any(ok for _, ok, _ in s) for s in samples)}


def teacher_data(rows: dict[str, list[dict]], samples: dict[str, list[Samples]], out: Path) -> dict:
    """Write sft.jsonl, stage2.jsonl, teacher_pairs.jsonl and probe_pairs.jsonl; returns the stats."""
    stats = {split: counts(rows[split], samples[split]) for split in rows}
    sft = [{"problem": r["problem"], "response": t, "answer": r["answer"]}
           for r, s in zip(rows["sft"], samples["sft"]) for t in correct(s)]
    stats["sft"]["kept"] = len(sft)
    pairs = {split: [{"prompt": r["problem"], "chosen": first(s, True), "rejected": first(s, False),
                      "answer": r["answer"]} for r, s in zip(rows[split], samples[split])
                     if first(s, True) and first(s, False)] for split in ("stage2", "val")}
    for split, p in pairs.items():
        stats[split]["pairs"] = len(p)
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "teacher_pairs.jsonl", pairs["stage2"])
    write_jsonl(out / "stage2.jsonl", ({"problem": p["prompt"], "response": p["chosen"], "answer": p["answer"]}
                                       for p in pairs["stage2"]))
    probe = [dict(p, kind=probe_kind(p["prompt"], p["chosen"], p["rejected"])) for p in pairs["val"]]
    write_jsonl(out / "probe_pairs.jsonl", probe)
    stats["probe_kinds"] = {k: sum(p["kind"] == k for p in probe) for k in sorted({p["kind"] for p in probe})}
    stats["stage2"]["in_order_chosen"] = sum(is_in_order(p["prompt"], p["chosen"]) for p in pairs["stage2"])
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def student_data(pairs: list[dict], samples: list[Samples], out: Path) -> dict:
    """From the base's samples on the teacher pairs' problems: student_pairs.jsonl and rft.jsonl; the stats."""
    student_pairs = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": first(s, False),
                      "answer": p["answer"]} for p, s in zip(pairs, samples) if first(s, False)]
    rft = []
    for p, s in zip(pairs, samples):
        own = [t for t in correct(s) if t != p["chosen"]]
        rft += [{"problem": p["prompt"], "response": r, "answer": p["answer"]} for r in [p["chosen"], *own]]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "student_pairs.jsonl", student_pairs)
    write_jsonl(out / "rft.jsonl", rft)
    stats = dict(counts(pairs, samples), student_pairs=len(student_pairs), rft_rows=len(rft))
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats
