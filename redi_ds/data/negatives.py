"""Student negatives: REDI pairs from a model's own graded samples (on-policy negatives).

    python -m redi_ds.data.negatives --model EXPORT --data DIR --samples K --out DIR2 [generation options]

For every problem of ``--data`` (a folder written by ``redi_ds.data.prepare``, whose ``sft/`` set is read; a
``save_to_disk`` folder; or a JSONL / Parquet file) with ``problem`` (or ``prompt``), ``response`` (a correct
trace) and ``answer``, it samples K responses from the model with the evaluation backends (HF; vLLM on GPU),
grades each against the answer with ``redi_ds.eval.grade``, and pairs the data's correct response with the
model's first incorrect sample that has any text (an empty sample is counted, not used). For users who have only positive traces, or who want on-policy negatives.

Writes ``DIR2/pairs`` (``prompt``, ``chosen``, ``rejected``, ``answer``, ``source``), ``DIR2/sft`` (the same
problems' positives, so that continued SFT on DIR2 trains on exactly the pairs' problems; both
``save_to_disk`` folders, so ``data.path: DIR2`` feeds both stages) and ``DIR2/stats.json``: every problem and
sample is counted (problems with a negative, problems the model always got right, rows skipped for a missing
field with their first examples, truncated samples, grader timeouts and errors). The prompts are rendered
exactly as the trainer renders them (the same chat template and system prompt), so the negatives are the
model's own answers to the prompts it trains on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from redi_ds.errors import UserError
from redi_ds.eval.options import EvalOptions

FIELDS = ("response", "answer")


class NegativesError(UserError):
    """A user-caused problem (paths, data, options); its message is one line."""


@dataclass
class NegativesReport:
    problems: int = 0
    samples: int = 0
    correct: int = 0
    incorrect: int = 0
    truncated: int = 0
    empty: int = 0               # wrong samples with no text (not used as negatives)
    with_negative: int = 0
    all_correct: int = 0
    only_empty: int = 0          # problems whose wrong samples were all empty
    skipped: dict = field(default_factory=dict)          # reason -> count
    skipped_examples: dict = field(default_factory=dict)  # reason -> first row refs
    grading: dict = field(default_factory=dict)           # the grader's counters for this run
    seconds: float = 0.0

    def line(self) -> str:
        skipped = sum(self.skipped.values())
        return (f"{self.with_negative}/{self.problems} problems have a negative ({self.all_correct} always right); "
                f"{self.incorrect}/{self.samples} samples wrong ({self.empty} empty), {self.truncated} truncated; "
                f"{skipped} rows skipped"
                + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.skipped.items()))})" if skipped else ""))


def load_problems(path: str, split: str = "train") -> list[dict]:
    """Rows with prompt, response, answer (and their ``ref``) from a prepared folder, a saved dataset or a file."""
    import datasets

    if os.path.isdir(os.path.join(path, "sft")):
        path = os.path.join(path, "sft")
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.endswith((".jsonl", ".json")):
            return _jsonl_problems(path)
        elif path.endswith(".parquet"):
            ds = datasets.load_dataset("parquet", data_files=path, split="train")
        else:
            raise NegativesError(f"{path}: no such folder, or not a .jsonl / .json / .parquet file")
    except NegativesError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable data becomes one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise NegativesError(f"{path}: cannot load ({first})") from None
    return [dict(row, ref=f"{os.path.basename(path.rstrip('/'))} row {i}") for i, row in enumerate(ds)]


def _jsonl_problems(path: str) -> list[dict]:
    """A JSON Lines file read line by line: a bad line (not UTF-8, invalid JSON, a duplicate key, a lone surrogate)
    is a one-line error naming the file and the line, as in training."""
    from redi_ds.textio import iter_jsonl

    rows = []
    for lineno, row, bad in iter_jsonl(path):
        if bad:
            raise NegativesError(f"{path}:{lineno}: {bad}")
        rows.append(dict(row, ref=f"{os.path.basename(path)}:{lineno}"))
    return rows


def sample_negatives(model, rows: list[dict], options: EvalOptions, *, progress: bool = True
                     ) -> tuple[list[dict], list[dict], NegativesReport]:
    """(pairs, positives of the same problems, report): ``options.samples`` samples per problem, graded."""

    t0 = time.time()
    report = NegativesReport()
    usable = []
    for row in rows:
        prompt = row.get("problem", row.get("prompt"))
        missing = "problem" if not isinstance(prompt, str) or not prompt.strip() else next(
            (f for f in FIELDS if not isinstance(row.get(f), str) or not row[f].strip()), None)
        if missing:
            report.skipped[f"missing_{missing}"] = report.skipped.get(f"missing_{missing}", 0) + 1
            report.skipped_examples.setdefault(f"missing_{missing}", [])
            if len(report.skipped_examples[f"missing_{missing}"]) < 5:
                report.skipped_examples[f"missing_{missing}"].append(row["ref"])
            continue
        usable.append((prompt, row))
    report.problems = len(usable)
    if not usable:
        raise NegativesError("no usable problem: every row lacks a problem, response or answer "
                             f"({', '.join(f'{k}: {v}' for k, v in report.skipped.items())})")
    per_problem = sample_graded(model, [p for p, _ in usable], [row["answer"] for _, row in usable], options,
                                progress=progress, report=report)
    first_wrong: dict[int, str] = {}
    any_wrong: set[int] = set()
    for i, samples in enumerate(per_problem):
        for text, ok, finish in samples:
            report.samples += 1
            report.truncated += int(finish == "length")
            if ok:
                report.correct += 1
                continue
            report.incorrect += 1
            any_wrong.add(i)
            if text.strip():
                first_wrong.setdefault(i, text)
            else:  # wrong, but nothing to train on: an end-of-turn at once
                report.empty += 1
    pairs, positives = [], []
    for i, (prompt, row) in enumerate(usable):
        if i not in first_wrong:
            report.all_correct += int(i not in any_wrong)
            report.only_empty += int(i in any_wrong)
            continue
        source = row.get("source", "")
        pairs.append({"prompt": prompt, "chosen": row["response"], "rejected": first_wrong[i],
                      "answer": row["answer"], "source": source})
        positives.append({"problem": prompt, "response": row["response"], "answer": row["answer"], "source": source})
    report.with_negative = len(pairs)
    report.seconds = round(time.time() - t0, 3)
    return pairs, positives, report


def sample_graded(model, problems: list[str], answers: list[str], options: EvalOptions, *, progress: bool = True,
                  report: Optional[NegativesReport] = None) -> list[list[tuple[str, bool, str]]]:
    """``options.samples`` samples of ``model`` per problem, rendered as the trainer renders prompts and graded
    against the answers: [[(text, correct, finish_reason)] per problem] (the grader's counters go to ``report``)."""
    from redi_ds.eval.backends import build_generator
    from redi_ds.eval.grading import STATS, grade_many
    from redi_ds.eval.prompting import build_prompt

    gen = build_generator(options.backend, model, tokenizer=options.tokenizer, chat_template=options.chat_template,
                          dtype=options.dtype, seed=options.seed, batch_size=options.batch_size,
                          **(options.backend_options or {}))
    try:
        prompts = [build_prompt(gen.tokenizer, p, system_prompt=options.system_prompt,
                                user_template=options.user_template, force_think=options.force_think)
                   for p in problems]
        bar = _bar(len(prompts), progress)
        completions = gen.generate(prompts, n=options.samples, temperature=options.temperature, top_p=options.top_p,
                                   max_new_tokens=options.max_new_tokens, progress=bar.update)
        bar.close()
    finally:
        gen.close()
    flat = [(i, c) for i, comps in enumerate(completions) for c in comps]
    before = dict(STATS)
    verdicts = grade_many([c.text for _, c in flat], [answers[i] for i, _ in flat],
                          workers=options.grade_workers, timeout=options.grade_timeout)
    if report is not None:
        report.grading = {k: STATS[k] - before[k] for k in STATS}
    out: list[list[tuple[str, bool, str]]] = [[] for _ in problems]
    for (i, c), ok in zip(flat, verdicts):
        out[i].append((c.text, bool(ok), c.finish_reason))
    return out


def write(out: str, pairs: list[dict], positives: list[dict], report: NegativesReport, settings: dict) -> None:
    import datasets

    os.makedirs(out, exist_ok=True)
    for name, rows in (("pairs", pairs), ("sft", positives)):
        datasets.Dataset.from_list(rows).save_to_disk(os.path.join(out, name))
    stats = {"settings": settings, **report.__dict__}
    with open(os.path.join(out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)


def _bar(total: int, enabled: bool):
    from redi_ds.eval.runner import _progress_bar

    return _progress_bar(total, enabled=enabled, desc="sample")


def main(argv: Optional[Sequence[str]] = None, prog: str = "redi-ds negatives") -> int:
    from redi_ds.eval.__main__ import add_option_args, options_from_args
    from redi_ds.eval.errors import EvalError

    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an HF folder (e.g. an SFT export) or hub name")
    p.add_argument("--data", required=True, help="prepared folder, save_to_disk folder, .jsonl or .parquet")
    p.add_argument("--out", required=True, help="output folder (pairs/, sft/, stats.json)")
    p.add_argument("--split", default="train")
    add_option_args(p, samples=4, temperature=1.0, top_p=1.0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    options = options_from_args(args)
    if os.path.exists(os.path.join(args.out, "pairs")):
        print(f"error: {args.out}/pairs exists; choose another --out", file=sys.stderr)
        return 2
    try:
        from redi_ds.errors import ConfigError
        from redi_ds.textio import writable_dir

        try:
            writable_dir(args.out, "--out")  # before sampling and grading anything
        except ConfigError as e:
            raise NegativesError(str(e)) from None
        options.check()
        rows = load_problems(args.data, args.split)
        if options.limit:
            rows = rows[: options.limit]
        pairs, positives, report = sample_negatives(args.model, rows, options, progress=not args.no_progress)
        write(args.out, pairs, positives, report, {"model": args.model, "data": args.data, **options.__dict__})
    except (NegativesError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"negatives: {report.line()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
