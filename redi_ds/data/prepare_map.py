"""The per-row work of ``redi_ds.data.prepare``, run inside ``Dataset.map`` workers (``num_proc``).

``problem_batch`` takes per-problem rows (OpenR1 layout, raw JSON lines, or plain rows already grouped by
problem), applies the problem filters, grades generations without flags, selects the SFT response and the
(chosen, rejected) pairs, counts tokens and applies the length limits. ``plain_batch`` normalises plain rows
(one generation each) before they are grouped. The tokenizer and the grader are loaded lazily, once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from typing import Any, Optional

import xxhash
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value
from datasets.arrow_writer import ArrowWriter

from redi_ds.data import layouts
from redi_ds.data.layouts import Bad

PROBLEM_FEATURES = Features(
    {
        "status": Value("string"),  # ok | bad:<reason> | invalid_problem | source_excluded | contaminated
        "ref": Value("string"),  # where the row came from (file:line or row N), set for bad rows
        "problem": Value("string"),
        "answer": Value("string"),
        "source": Value("string"),
        "flag_mode": Value("string"),
        "contam": Sequence(Value("string")),
        "n_gens": Value("int32"),
        "n_empty": Value("int32"),
        "n_graded": Value("int32"),
        "n_correct": Value("int32"),
        "n_incorrect": Value("int32"),
        "prompt_len": Value("int32"),
        "sft": Value("string"),
        "sft_len": Value("int32"),
        "sft_too_long": Value("bool"),
        "chosen": Sequence(Value("string")),
        "rejected": Sequence(Value("string")),
        "chosen_len": Sequence(Value("int32")),
        "rejected_len": Sequence(Value("int32")),
        "pair_candidates": Value("int32"),
        "drop_prompt": Value("int32"),
        "drop_chosen": Value("int32"),
        "drop_rejected": Value("int32"),
    }
)
PLAIN_FEATURES = Features(
    {
        "status": Value("string"),
        "ref": Value("string"),
        "key": Value("int64"),
        "problem": Value("string"),
        "answer": Value("string"),
        "source": Value("string"),
        "problem_is_valid": Value("string"),
        "response": Value("string"),
        "flag": Value("int8"),
        "flag_mode": Value("string"),
    }
)


@dataclass
class Ctx:
    spec: Any  # layouts.parse_flag_spec result
    renames: tuple = ()
    require_valid: bool = True
    exclude_sources: tuple = ()
    index: Any = None  # decontam.NgramIndex or None
    pairing: str = "first"  # first | zip | all
    max_pairs: int = 0
    max_prompt_tokens: int = 800
    max_response_tokens: int = 19000
    sft_max_tokens: int = 32768
    tokenizer: str = ""
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    perm: Any = None  # shuffle permutation (numpy) to report original row numbers


_TOKENIZERS: dict = {}
_GRADER: list = []


def get_tokenizer(path: str):
    if path not in _TOKENIZERS:
        from redi_ds.hf_tokenizer import auto_tokenizer

        _TOKENIZERS[path] = auto_tokenizer(path)
    return _TOKENIZERS[path]


def get_grader():
    """``redi_ds.eval.grade``, imported on first use (in each worker process)."""
    if not _GRADER:
        from redi_ds.eval import grade

        _GRADER.append(grade)
    return _GRADER[0]


def _rows(batch: dict, indices, ctx: Ctx):
    """(row dict or Bad, ref) per batch row."""
    cols = list(batch)
    n = len(batch[cols[0]]) if cols else 0
    for j in range(n):
        if "_ref" in batch:
            ref = batch["_ref"][j]
        else:
            i = int(indices[j])
            ref = f"row {int(ctx.perm[i]) if ctx.perm is not None else i}"
        if "_line" in batch:
            bad = batch["_bad"][j] if "_bad" in batch else None  # set when reading the line (invalid_utf8)
            row = Bad(bad) if bad else layouts.parse_line(batch["_line"][j])
        else:
            row = {c: batch[c][j] for c in cols if c != "_ref"}
        if not isinstance(row, Bad) and ctx.renames:
            row = layouts.apply_renames(row, ctx.renames)
        yield row, ref


def plain_batch(batch: dict, indices, ctx: Ctx) -> dict:
    out = {k: [] for k in PLAIN_FEATURES}
    for row, ref in _rows(batch, indices, ctx):
        rec = row if isinstance(row, Bad) else layouts.normalize_plain(row, ctx.spec)
        if isinstance(rec, Bad):
            rec = dict.fromkeys(PLAIN_FEATURES) | {"status": f"bad:{rec.reason}", "ref": ref, "key": 0, "flag": -1}
        else:
            rec = rec | {"status": "ok", "ref": ref, "key": xxhash.xxh3_64_intdigest(rec["problem"].encode()) >> 1}
        for k in out:
            out[k].append(rec[k])
    return out


def _select(flags: list, gens: list, pairing: str, max_pairs: int) -> tuple:
    good = [i for i, f in enumerate(flags) if f == layouts.CORRECT and not layouts.blank(gens[i])]
    bad = [i for i, f in enumerate(flags) if f == layouts.INCORRECT and not layouts.blank(gens[i])]
    if not (good and bad):
        pairs = []
    elif pairing == "first":
        pairs = [(good[0], bad[0])]
    elif pairing == "zip":
        pairs = list(zip(good, bad))
    else:
        pairs = [(c, r) for c in good for r in bad]
    if max_pairs > 0:
        pairs = pairs[:max_pairs]
    return good, bad, pairs


def _empty_row(status: str, ref: Optional[str]) -> dict:
    row = dict.fromkeys(PROBLEM_FEATURES)
    row.update(status=status, ref=ref, contam=[], chosen=[], rejected=[], chosen_len=[], rejected_len=[])
    for k in ("n_gens", "n_empty", "n_graded", "n_correct", "n_incorrect", "pair_candidates"):
        row[k] = 0
    for k in ("drop_prompt", "drop_chosen", "drop_rejected"):
        row[k] = 0
    row.update(prompt_len=-1, sft_len=-1, sft_too_long=False)
    return row


def problem_batch(batch: dict, indices, ctx: Ctx) -> dict:
    rows, work = [], []  # work: (output row, Problem, good, bad, pairs) for problems that reach selection
    for raw, ref in _rows(batch, indices, ctx):
        rec = raw if isinstance(raw, Bad) else layouts.normalize_openr1(raw, ctx.spec)
        if isinstance(rec, Bad):
            rows.append(_empty_row(f"bad:{rec.reason}", ref))
            continue
        row = _empty_row("ok", None)
        row.update(problem=rec.problem, answer=rec.answer, source=rec.source, n_gens=len(rec.generations))
        rows.append(row)
        if ctx.require_valid and rec.valid is False:
            row["status"] = "invalid_problem"
        elif rec.source in ctx.exclude_sources:
            row["status"] = "source_excluded"
        elif ctx.index is not None and (hits := ctx.index.match(rec.problem)):
            row.update(status="contaminated", contam=hits)
        if row["status"] != "ok":
            continue
        flags = rec.flags
        for i, f in enumerate(flags):
            if f == layouts.UNKNOWN and not layouts.blank(rec.generations[i]):
                flags[i] = int(bool(get_grader()(rec.generations[i], rec.answer)))
                row["n_graded"] += 1
        good, bad, pairs = _select(flags, rec.generations, ctx.pairing, ctx.max_pairs)
        row.update(
            flag_mode=rec.flag_mode,
            n_empty=sum(1 for g in rec.generations if layouts.blank(g)),
            n_correct=len(good),
            n_incorrect=len(bad),
            pair_candidates=len(pairs),
        )
        work.append((row, rec, good, pairs))
    if work:
        _lengths_and_limits(work, ctx)
    return {k: [r[k] for r in rows] for k in PROBLEM_FEATURES}


def _lengths_and_limits(work: list, ctx: Ctx) -> None:
    tok = get_tokenizer(ctx.tokenizer)
    texts, slots = [], []
    for row, rec, good, pairs in work:
        msgs = ([{"role": "system", "content": ctx.system_prompt}] if ctx.system_prompt else []) + [
            {"role": "user", "content": rec.problem}
        ]
        texts.append(
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=ctx.chat_template)
        )
        need = sorted(({good[0]} if good else set()) | {i for p in pairs for i in p})
        texts.extend(rec.generations[i] for i in need)
        slots.append(need)
    lengths = [len(e) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    pos = 0
    for (row, rec, good, pairs), need in zip(work, slots):
        plen = lengths[pos]
        glen = dict(zip(need, lengths[pos + 1 : pos + 1 + len(need)]))
        pos += 1 + len(need)
        row["prompt_len"] = plen
        if good:
            row["sft_len"] = glen[good[0]]
            if ctx.sft_max_tokens > 0 and plen + glen[good[0]] > ctx.sft_max_tokens:
                row["sft_too_long"] = True
            else:
                row["sft"] = rec.generations[good[0]]
        for c, r in pairs:
            if ctx.max_prompt_tokens > 0 and plen > ctx.max_prompt_tokens:
                row["drop_prompt"] += 1
            elif ctx.max_response_tokens > 0 and glen[c] > ctx.max_response_tokens:
                row["drop_chosen"] += 1
            elif ctx.max_response_tokens > 0 and glen[r] > ctx.max_response_tokens:
                row["drop_rejected"] += 1
            else:
                row["chosen"].append(rec.generations[c])
                row["rejected"].append(rec.generations[r])
                row["chosen_len"].append(glen[c])
                row["rejected_len"].append(glen[r])


def explode_pairs(batch: dict) -> dict:
    out = {"prompt": [], "chosen": [], "rejected": [], "answer": [], "source": []}
    for problem, answer, source, chosen, rejected in zip(
        batch["problem"], batch["answer"], batch["source"], batch["chosen"], batch["rejected"]
    ):
        for c, r in zip(chosen, rejected):
            out["prompt"].append(problem)
            out["chosen"].append(c)
            out["rejected"].append(r)
            out["answer"].append(answer)
            out["source"].append(source)
    return out


def group_plain(rows, work: str):
    """Plain rows -> one row per problem (first-appearance order) with parallel generations/_flags lists."""
    status = rows.data.column("status")
    ok = np.flatnonzero(pc.equal(status, "ok").to_numpy(zero_copy_only=False))
    keys = rows.data.column("key").to_numpy(zero_copy_only=False)[ok]
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    order = ok[np.argsort(rank[inv], kind="stable")]
    features = Features(
        {
            "problem": Value("string"),
            "answer": Value("string"),
            "source": Value("string"),
            "problem_is_valid": Value("string"),
            "generations": Sequence(Value("string")),
            "_flags": Sequence(Value("int8")),
            "_flag_mode": Value("string"),
            "_ref": Value("string"),
        }
    )
    path = os.path.join(work, "grouped.arrow")
    writer = ArrowWriter(features=features, path=path, writer_batch_size=256)

    def flush(run: dict) -> None:
        for g in run.values():
            modes = sorted(set(g.pop("_modes")))
            g["_flag_mode"] = modes[0] if len(modes) == 1 else "mixed"
            writer.write(g)

    try:
        run, run_key = {}, None
        for batch in rows.select(order, keep_in_memory=True).iter(batch_size=512):
            for j, key in enumerate(batch["key"]):
                if key != run_key:
                    flush(run)
                    run, run_key = {}, key
                text = batch["problem"][j]
                g = run.get(text)
                if g is None:
                    g = run[text] = {
                        "problem": text,
                        "answer": batch["answer"][j],
                        "source": batch["source"][j],
                        "problem_is_valid": batch["problem_is_valid"][j],
                        "generations": [],
                        "_flags": [],
                        "_modes": [],
                        "_ref": batch["ref"][j],
                    }
                g["generations"].append(batch["response"][j])
                g["_flags"].append(batch["flag"][j])
                g["_modes"].append(batch["flag_mode"][j])
        flush(run)
        writer.finalize()
    finally:
        writer.close()
    return Dataset.from_file(path)
