"""``stats.json`` for ``redi_ds.data.prepare``, computed from the small columns of the per-problem table with
pyarrow/numpy (texts are never pulled into Python)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HIST_EDGES = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
EXAMPLES_PER_REASON = 5


def _np(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False)


def _status_counts(status: pa.ChunkedArray) -> dict:
    vc = pc.value_counts(status).to_pylist() if len(status) else []
    return {d["values"]: int(d["counts"]) for d in vc}


def bad_report(t: pa.Table) -> dict:
    """{"total", "by_reason", "examples"} for rows whose status is bad:<reason>."""
    counts = {s[4:]: n for s, n in _status_counts(t.column("status")).items() if s and s.startswith("bad:")}
    examples = {}
    for reason in sorted(counts):
        mask = pc.equal(t.column("status"), f"bad:{reason}")
        examples[reason] = pc.filter(t.column("ref"), mask).slice(0, EXAMPLES_PER_REASON).to_pylist()
    return {"total": sum(counts.values()), "by_reason": dict(sorted(counts.items())), "examples": examples}


def length_summary(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return {"count": 0}
    top = int(values.max())
    edges = [e for e in HIST_EDGES if e <= top] + [next((e for e in HIST_EDGES if e > top), top + 1)]
    counts, _ = np.histogram(values, bins=edges)
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 2),
        "p50": int(np.percentile(values, 50, method="lower")),
        "p90": int(np.percentile(values, 90, method="lower")),
        "p99": int(np.percentile(values, 99, method="lower")),
        "histogram": {"edges": edges, "counts": [int(c) for c in counts]},
    }


def compute(proc: pa.Table, rows: pa.Table | None, info: dict) -> dict:
    """proc: the per-problem table; rows: the plain per-row table (None for the OpenR1 layout)."""
    status = proc.column("status")
    st = _status_counts(status)
    ok = pc.equal(status, "ok")
    # select the small columns before filtering: filtering a table copies every column it has
    okt = proc.select(
        ["source", "flag_mode", "n_gens", "n_empty", "n_graded", "n_correct", "n_incorrect", "prompt_len", "sft_len",
         "sft_too_long", "chosen_len", "rejected_len", "pair_candidates", "drop_prompt", "drop_chosen",
         "drop_rejected"]
    ).filter(ok).combine_chunks()
    has_sft = pc.filter(pc.is_valid(proc.column("sft")), ok).to_numpy(zero_copy_only=False)
    n_pairs = pc.list_value_length(okt.column("chosen_len")).to_numpy(zero_copy_only=False).astype(np.int64)
    n_correct, n_incorrect = _np(okt, "n_correct"), _np(okt, "n_incorrect")

    bad = bad_report(rows if rows is not None else proc)
    input_rows = rows.num_rows if rows is not None else proc.num_rows
    counts = {
        "input_rows": input_rows,
        "bad_rows": bad["total"],
        "problems": proc.num_rows - (0 if rows is not None else bad["total"]),
        "invalid_problem": st.get("invalid_problem", 0),
        "source_excluded": st.get("source_excluded", 0),
        "contaminated": st.get("contaminated", 0),
        "kept_problems": okt.num_rows,
        "problems_with_correct": int((n_correct > 0).sum()),
        "problems_without_correct": int((n_correct == 0).sum()),
        "problems_with_correct_and_incorrect": int(((n_correct > 0) & (n_incorrect > 0)).sum()),
        "sft_candidates": int((n_correct > 0).sum()),
        "sft_too_long": int(_np(okt, "sft_too_long").sum()),
        "sft_rows": int(has_sft.sum()),
        "pair_candidates": int(_np(okt, "pair_candidates").sum()),
        "pairs_prompt_too_long": int(_np(okt, "drop_prompt").sum()),
        "pairs_chosen_too_long": int(_np(okt, "drop_chosen").sum()),
        "pairs_rejected_too_long": int(_np(okt, "drop_rejected").sum()),
        "pairs": int(n_pairs.sum()),
    }
    generations = {
        "total": int(_np(okt, "n_gens").sum()),
        "empty_text": int(_np(okt, "n_empty").sum()),
        "graded": int(_np(okt, "n_graded").sum()),
        "correct": int(n_correct.sum()),
        "incorrect": int(n_incorrect.sum()),
        "correctness_from": _status_counts(okt.column("flag_mode")),
    }
    per_source = {}
    if okt.num_rows:
        src = okt.column("source").to_numpy(zero_copy_only=False)
        names, inv = np.unique(src, return_inverse=True)
        sums = {k: np.bincount(inv, weights=_np(okt, k), minlength=len(names)) for k in ("n_gens", "n_correct")}
        with_correct = np.bincount(inv, weights=(n_correct > 0), minlength=len(names))
        sft_rows = np.bincount(inv, weights=has_sft, minlength=len(names))
        pairs = np.bincount(inv, weights=n_pairs, minlength=len(names))
        problems = np.bincount(inv, minlength=len(names))
        for i, name in enumerate(names):
            gens = int(sums["n_gens"][i])
            per_source[str(name)] = {
                "problems": int(problems[i]),
                "generations": gens,
                "correct": int(sums["n_correct"][i]),
                "pass_rate": round(float(sums["n_correct"][i]) / gens, 4) if gens else None,
                "problems_with_correct": int(with_correct[i]),
                "problem_pass_rate": round(float(with_correct[i]) / int(problems[i]), 4),
                "sft_rows": int(sft_rows[i]),
                "pairs": int(pairs[i]),
            }
    contam = pc.list_flatten(pc.filter(proc.column("contam"), pc.equal(status, "contaminated")))
    matched = _status_counts(contam)
    prompt_len = _np(okt, "prompt_len")
    lengths = {
        "prompt": length_summary(np.repeat(prompt_len, n_pairs)),
        "chosen": length_summary(pc.list_flatten(okt.column("chosen_len")).to_numpy(zero_copy_only=False)),
        "rejected": length_summary(pc.list_flatten(okt.column("rejected_len")).to_numpy(zero_copy_only=False)),
        "sft_prompt": length_summary(prompt_len[has_sft]),
        "sft_response": length_summary(_np(okt, "sft_len")[has_sft]),
    }
    return {
        **info,
        "counts": counts,
        "bad_rows": bad,
        "generations": generations,
        "decontamination": {
            **info.get("decontamination", {}),
            "dropped": counts["contaminated"],
            "matched_eval_ids": sorted(matched),
            "matches_per_eval_id": dict(sorted(matched.items())),
        },
        "per_source": per_source,
        "lengths": lengths,
    }


def report_lines(stats: dict) -> list:
    c = stats["counts"]
    lines = [f"input rows {c['input_rows']}: bad rows {c['bad_rows']}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in stats["bad_rows"]["by_reason"].items()) + ")" if c["bad_rows"] else ""
    )]
    lines.append(
        f"problems {c['problems']}: invalid {c['invalid_problem']}, source excluded {c['source_excluded']}, "
        f"contaminated {c['contaminated']} -> kept {c['kept_problems']}"
    )
    g = stats["generations"]
    lines.append(f"generations {g['total']}: correct {g['correct']}, incorrect {g['incorrect']}, "
                 f"graded {g['graded']}, empty {g['empty_text']}")
    lines.append(f"sft: {c['sft_candidates']} candidates, {c['sft_too_long']} too long -> {c['sft_rows']} rows")
    lines.append(
        f"pairs: {c['pair_candidates']} candidates, prompt too long {c['pairs_prompt_too_long']}, chosen too long "
        f"{c['pairs_chosen_too_long']}, rejected too long {c['pairs_rejected_too_long']} -> {c['pairs']} pairs"
    )
    if stats["decontamination"].get("matched_eval_ids"):
        ids = stats["decontamination"]["matched_eval_ids"]
        lines.append(f"decontamination matched {len(ids)} eval problems: {', '.join(ids[:10])}"
                     + (" ..." if len(ids) > 10 else ""))
    return lines
