"""Build the SFT set and the (chosen, rejected) pairs for REDI from teacher traces.

    python -m redi_ds.data.prepare --source NAME_OR_PATH --out DIR [--recipe redi-paper] [--num-proc N]

Reads OpenR1-Math style rows (one problem, several generations, correctness flags) or plain
(problem, answer, response) JSON Lines, local or from the HF hub, and writes ``DIR/sft`` (problem, response,
answer, source), ``DIR/pairs`` (prompt, chosen, rejected, answer, source) with ``save_to_disk`` and
``DIR/stats.json`` (every filter's count, bad rows by reason, decontamination matches, token-length histograms,
pass rates per source). Same input and options give the same bytes. Everything streams through Arrow files in
a work folder under DIR (removed at the end); the heavy per-problem work runs in ``Dataset.map(num_proc=...)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow.compute as pc
import xxhash

from redi_ds.config import PAPER_SYSTEM_PROMPT
from redi_ds.data import decontam as dc
from redi_ds.data import layouts, prepare_stats
from redi_ds.errors import ConfigError
from redi_ds.textio import writable_dir
from redi_ds.data.prepare_io import PrepareError, detect, open_source
from redi_ds.data.prepare_map import (
    PROBLEM_FEATURES,
    Ctx,
    explode_pairs,
    get_tokenizer,
    group_plain,
    plain_batch,
    problem_batch,
)

SFT_COLUMNS = ["problem", "response", "answer", "source"]
PAIR_COLUMNS = ["prompt", "chosen", "rejected", "answer", "source"]
PAPER_TEMPLATE = "chat_template_qwen2.5_math.jinja"
USED_FIELDS = ("problem", "answer", "source", "problem_is_valid", "generations", "response", "correctness",
               *layouts.PARALLEL_FIELDS, *layouts.PAPER_FLAGS, *layouts.DEFAULT_SPLIT_FLAGS)
RUN_ONLY = ("out", "num_proc", "batch_size", "quiet")  # options that never change the output bytes

# The paper's recipe (arXiv 2505.24850 on OpenR1-Math-Raw); every key can be overridden on the command line.
RECIPES = {
    "redi-paper": dict(
        seed=42,
        require_valid=True,
        exclude_sources=("cn_k12",),
        flags="auto",  # llama_verification AND math_verify_reparsed_answer where present
        pairing="first",
        max_pairs=0,
        max_prompt_tokens=800,
        max_response_tokens=19000,
        sft_max_tokens=32768,
        decontam=True,
    ),
}


@dataclass
class PrepareOptions:
    source: str
    out: str
    recipe: str = "redi-paper"
    split: str = "train"
    config: Optional[str] = None  # HF dataset config name
    layout: str = "auto"  # auto | openr1 | plain
    renames: tuple = ()  # ((old, new), ...) applied to every row before anything else
    flags: str = "auto"  # auto | grade | comma-separated flag names that must all be true
    seed: int = 42  # shuffle seed; -1: keep the input order
    require_valid: bool = True  # drop problem_is_valid != "yes" (rows without the field are kept)
    exclude_sources: tuple = ("cn_k12",)
    pairing: str = "first"  # first | zip | all
    max_pairs: int = 0  # >0: at most this many pairs per problem
    max_prompt_tokens: int = 800  # pairs: chat-templated prompt limit (0: none)
    max_response_tokens: int = 19000  # pairs: limit for chosen and rejected each (0: none)
    sft_max_tokens: int = 32768  # SFT: prompt + response limit (0: none)
    decontam: bool = True
    decontam_sets: tuple = dc.DEFAULT_SETS
    ngram: int = 13
    decontam_threshold: float = 0.5
    tokenizer: str = "qwen2.5"  # "qwen2.5" (bundled) or a tokenizer folder / hub name
    chat_template: Optional[str] = None  # None: the paper's for the bundled tokenizer, else the tokenizer's; or a path
    system_prompt: Optional[str] = PAPER_SYSTEM_PROMPT
    num_proc: int = 1
    batch_size: int = 64
    quiet: bool = False


def _resolve_tokenizer(opts: PrepareOptions) -> tuple:
    from redi_ds.eval.prompting import resolve_tokenizer

    path = resolve_tokenizer(opts.tokenizer)  # a bundled name (qwen2.5, arith) or a folder / hub name
    template = opts.chat_template
    if template is None and opts.tokenizer == "qwen2.5":
        template = os.path.join(path, PAPER_TEMPLATE)
    if template == "tokenizer":
        template = None
    if template is not None:
        if not os.path.isfile(template):
            raise PrepareError(f"--chat-template: no such file {template}")
        with open(template, encoding="utf-8") as f:
            template = f.read()
    try:
        tok = get_tokenizer(path)
        msgs = [{"role": "user", "content": "x"}]
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise PrepareError(f"--tokenizer {opts.tokenizer}: {' '.join(str(e).split())[:300]}") from None
    return path, template


def _fingerprint(opts: PrepareOptions, step: str) -> str:
    keep = {k: v for k, v in dataclasses.asdict(opts).items() if k not in RUN_ONLY}
    return xxhash.xxh64_hexdigest((json.dumps(keep, sort_keys=True, default=str) + step).encode())


def _map(ds, fn, opts, work, name, features, fn_kwargs=None, with_indices=False, batch_size=None):
    num_proc = min(opts.num_proc, len(ds)) if opts.num_proc > 1 and len(ds) > 1 else None
    return ds.map(
        fn,
        batched=True,
        batch_size=batch_size or opts.batch_size,
        with_indices=with_indices,
        fn_kwargs=fn_kwargs,
        remove_columns=ds.column_names,
        features=features,
        num_proc=num_proc,
        cache_file_name=os.path.join(work, f"{name}.arrow"),
        writer_batch_size=opts.batch_size,
        new_fingerprint=_fingerprint(opts, name),
        load_from_cache_file=False,
        desc=None if opts.quiet else f"prepare: {name}",
    )


def _fail_if_all_bad(table, label: str) -> None:
    bad = prepare_stats.bad_report(table)
    if table.num_rows and bad["total"] == table.num_rows:
        reasons = ", ".join(f"{k} {v}" for k, v in bad["by_reason"].items())
        raise PrepareError(f"{label}: no usable rows: all {table.num_rows} rows are malformed ({reasons})")


def _check_options(opts: PrepareOptions) -> None:
    """Values that would silently change the output (0-grams mark everything contaminated; a threshold outside
    (0, 1] turns decontamination off) are one-line errors, before any work."""
    if opts.pairing not in ("first", "zip", "all"):
        raise PrepareError(f"--pairing must be first, zip or all (got {opts.pairing!r})")
    if opts.ngram < 1:
        raise PrepareError(f"--ngram must be >= 1 (got {opts.ngram})")
    if not 0 < opts.decontam_threshold <= 1:
        raise PrepareError(f"--decontam-threshold must be in (0, 1] (got {opts.decontam_threshold})")
    for name in ("max_pairs", "max_prompt_tokens", "max_response_tokens", "sft_max_tokens"):
        if getattr(opts, name) < 0:
            raise PrepareError(f"--{name.replace('_', '-')} must be >= 0 (0: no limit; got {getattr(opts, name)})")
    if opts.num_proc < 1 or opts.batch_size < 1:
        raise PrepareError(f"--num-proc and --batch-size must be >= 1 (got {opts.num_proc}, {opts.batch_size})")


def _check_out(out: str) -> None:
    for name in ("sft", "pairs"):
        p = os.path.join(out, name)
        if os.path.exists(p) and not os.path.exists(os.path.join(p, "state.json")):
            raise PrepareError(f"{p} exists and is not a saved dataset; choose another --out")


def prepare(opts: PrepareOptions) -> dict:
    """Run the whole preparation; returns the stats written to ``DIR/stats.json``."""
    import datasets

    from redi_ds.eval.grading import GradeError, shutdown_workers  # light: a grader starts only when a row needs it

    if opts.quiet:
        datasets.disable_progress_bars()
    _check_options(opts)
    try:
        spec = layouts.parse_flag_spec(opts.flags)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    created = not os.path.exists(opts.out)
    try:
        writable_dir(opts.out, "--out")
    except ConfigError as e:
        raise PrepareError(str(e)) from None
    _check_out(opts.out)
    os.makedirs(opts.out, exist_ok=True)
    work = os.path.join(opts.out, f".prepare-work-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    if opts.num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _prepare(opts, spec, work)
    except GradeError as e:  # redi_ds.eval cannot grade at all (math-verify missing)
        raise PrepareError(f"grading failed: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not os.listdir(opts.out):  # a failed run leaves no empty output folder behind
            os.rmdir(opts.out)
        shutdown_workers()  # stop this process's grader worker, if grading started one


def _prepare(opts: PrepareOptions, spec, work: str) -> dict:
    import datasets

    ds, label = open_source(opts.source, work, opts.split, opts.config)
    layout = detect(ds, opts.layout, opts.renames, label)
    tok_path, template = _resolve_tokenizer(opts)
    if "_line" not in ds.column_names:  # Arrow source: never convert columns the map does not read
        used = set(USED_FIELDS) | {old for old, _ in opts.renames} | set(spec if isinstance(spec, tuple) else ())
        ds = ds.select_columns([c for c in ds.column_names if c in used],
                               new_fingerprint=_fingerprint(opts, "columns"))
    perm = None
    if opts.seed is not None and opts.seed >= 0:
        perm = np.random.default_rng(opts.seed).permutation(len(ds))  # == Dataset.shuffle(seed=...)
        ds = ds.select(perm, keep_in_memory=True, new_fingerprint=_fingerprint(opts, "shuffle"))
    index = None
    if opts.decontam:
        try:
            evals = dc.load_eval_problems(opts.decontam_sets)
        except ValueError as e:
            raise PrepareError(str(e)) from None
        index = dc.NgramIndex.build(evals, n=opts.ngram, threshold=opts.decontam_threshold)
    ctx = Ctx(
        spec=spec, renames=tuple(opts.renames), require_valid=opts.require_valid,
        exclude_sources=tuple(opts.exclude_sources), index=index, pairing=opts.pairing, max_pairs=opts.max_pairs,
        max_prompt_tokens=opts.max_prompt_tokens, max_response_tokens=opts.max_response_tokens,
        sft_max_tokens=opts.sft_max_tokens, tokenizer=tok_path, chat_template=template,
        system_prompt=opts.system_prompt, perm=perm,
    )
    rows = None
    if layout == "plain":
        from redi_ds.data.prepare_map import PLAIN_FEATURES

        rows = _map(ds, plain_batch, opts, work, "rows", PLAIN_FEATURES, {"ctx": ctx}, with_indices=True,
                    batch_size=512)
        _fail_if_all_bad(rows.data.table, label)
        ds = group_plain(rows, work)
        ctx = dataclasses.replace(ctx, renames=(), perm=None)
    proc = _map(ds, problem_batch, opts, work, "problems", PROBLEM_FEATURES, {"ctx": ctx}, with_indices=True)
    # num_proc > 1 drops the split name; pin it so state.json does not depend on num_proc
    proc = datasets.Dataset(proc.data, info=proc.info, split="train", fingerprint=_fingerprint(opts, "problems"))

    info = {
        "input": {"source": label, "layout": layout, "split": opts.split},
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k not in RUN_ONLY},
        "decontamination": {
            "enabled": opts.decontam, "ngram": opts.ngram, "threshold": opts.decontam_threshold,
            "eval_problems": dict(sorted(index.sets.items())) if index else {},
        },
    }
    table = proc.data.table
    stats = prepare_stats.compute(table, rows.data.table if rows is not None else None, info)
    c = stats["counts"]
    if rows is None:
        _fail_if_all_bad(table, label)

    sft_idx = np.flatnonzero(pc.is_valid(table.column("sft")).to_numpy(zero_copy_only=False))
    sft = proc.select(sft_idx, keep_in_memory=True, new_fingerprint=_fingerprint(opts, "sft-select"))
    sft = sft.select_columns(["problem", "sft", "answer", "source"]).rename_column("sft", "response")
    sft = sft.select_columns(SFT_COLUMNS, new_fingerprint=_fingerprint(opts, "sft"))
    n_pairs = pc.list_value_length(table.column("chosen")).to_numpy(zero_copy_only=False)
    pair_idx = np.flatnonzero(n_pairs > 0)
    pairs = proc.select(pair_idx, keep_in_memory=True, new_fingerprint=_fingerprint(opts, "pairs-select"))
    pairs = pairs.select_columns(["problem", "answer", "source", "chosen", "rejected"])
    from datasets import Features, Value

    pair_features = Features({k: Value("string") for k in PAIR_COLUMNS})
    if len(pairs):
        pairs = _map(pairs, explode_pairs, dataclasses.replace(opts, num_proc=1), work, "pairs", pair_features,
                     batch_size=256)
    else:  # map on no rows keeps the input columns: build the empty table with the output schema
        pairs = datasets.Dataset.from_dict({k: [] for k in PAIR_COLUMNS}, features=pair_features, split="train")
    for name, d in (("sft", sft), ("pairs", pairs)):
        tmp = os.path.join(work, f"out-{name}")
        d.save_to_disk(tmp, num_shards=1 if len(d) == 0 else None)  # 0 shards would not load back
        final = os.path.join(opts.out, name)
        shutil.rmtree(final, ignore_errors=True)
        shutil.move(tmp, final)
    with open(os.path.join(opts.out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False, default=list)
        f.write("\n")
    if not opts.quiet:
        for line in prepare_stats.report_lines(stats):
            print(line)
        print(f"wrote {opts.out}/sft ({c['sft_rows']} rows), {opts.out}/pairs ({c['pairs']} pairs), stats.json")
    return stats


def _csv(value: str) -> tuple:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser(prog: str = "redi-ds prepare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="JSONL/Parquet file or folder, save_to_disk folder, or HF name")
    p.add_argument("--out", required=True, help="output folder: sft/, pairs/, stats.json")
    p.add_argument("--recipe", default="redi-paper", choices=sorted(RECIPES))
    p.add_argument("--split", default="train")
    p.add_argument("--config", default=None, help="HF dataset config name (e.g. default, extended)")
    p.add_argument("--layout", default="auto", choices=["auto", "openr1", "plain"])
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW[,OLD=NEW]",
                   help="rename row fields first, e.g. user_prompt=problem,regenerated_content=response")
    p.add_argument("--flags", default=None, help="auto | grade | comma-separated flags that must all be true")
    p.add_argument("--seed", type=int, default=None, help="shuffle seed (-1: keep input order)")
    p.add_argument("--keep-invalid", action="store_true", help="keep problem_is_valid != yes")
    p.add_argument("--exclude-sources", default=None, help="comma-separated sources to drop ('' for none)")
    p.add_argument("--pairing", default=None, choices=["first", "zip", "all"])
    p.add_argument("--max-pairs", type=int, default=None, help="at most K pairs per problem (0: no cap)")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-response-tokens", type=int, default=None)
    p.add_argument("--sft-max-tokens", type=int, default=None, help="SFT prompt+response limit (0: none)")
    p.add_argument("--no-decontam", action="store_true")
    p.add_argument("--decontam-sets", default=",".join(dc.DEFAULT_SETS))
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--decontam-threshold", type=float, default=0.5,
                   help="fraction of an eval problem's n-grams found in a training problem (0: any one)")
    p.add_argument("--tokenizer", default="qwen2.5")
    p.add_argument("--chat-template", default=None, help="a .jinja file, or 'tokenizer' for the tokenizer's own")
    p.add_argument("--num-proc", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    return p


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    r = dict(RECIPES[args.recipe])
    renames = []
    for spec in args.rename:
        for item in _csv(spec):
            old, sep, new = item.partition("=")
            if not sep or not old or not new:
                raise PrepareError(f"--rename: expected OLD=NEW, got {item!r}")
            renames.append((old, new))
    pick = lambda name, value: r[name] if value is None else value  # noqa: E731
    return PrepareOptions(
        source=args.source, out=args.out, recipe=args.recipe, split=args.split, config=args.config,
        layout=args.layout, renames=tuple(renames), flags=pick("flags", args.flags), seed=pick("seed", args.seed),
        require_valid=r["require_valid"] and not args.keep_invalid,
        exclude_sources=r["exclude_sources"] if args.exclude_sources is None else _csv(args.exclude_sources),
        pairing=pick("pairing", args.pairing), max_pairs=pick("max_pairs", args.max_pairs),
        max_prompt_tokens=pick("max_prompt_tokens", args.max_prompt_tokens),
        max_response_tokens=pick("max_response_tokens", args.max_response_tokens),
        sft_max_tokens=pick("sft_max_tokens", args.sft_max_tokens),
        decontam=r["decontam"] and not args.no_decontam, decontam_sets=_csv(args.decontam_sets), ngram=args.ngram,
        decontam_threshold=args.decontam_threshold, tokenizer=args.tokenizer, chat_template=args.chat_template,
        num_proc=args.num_proc, batch_size=args.batch_size, quiet=args.quiet,
    )


def main(argv=None, prog: str = "redi-ds prepare") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        prepare(options_from_args(args))
    except PrepareError as e:
        from redi_ds.cli import report

        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
