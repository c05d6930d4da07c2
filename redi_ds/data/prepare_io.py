"""Sources for ``redi_ds.data.prepare``: local JSONL / Parquet / save_to_disk folders, or an HF dataset name.

JSON Lines are read line by line into an Arrow table of raw lines (``_line``, ``_ref`` = ``file:line``) and parsed
later, in parallel, by the map that normalises rows: a row of the wrong type can then be counted as a bad row
instead of failing Arrow's schema inference for the whole file. A line that is not valid UTF-8 is never decoded
with replacement characters: it is stored with an empty ``_line`` and ``_bad`` = ``invalid_utf8``, which the map
counts as a bad row like any other (``_bad`` is None for the other lines). Everything else is read with
``datasets``.
"""

from __future__ import annotations

import gzip
import os
from glob import glob
from typing import Optional

from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk

from redi_ds.data import layouts
from redi_ds.errors import UserError

JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_EXT = (".parquet",)
LINE_FEATURES = Features({"_line": Value("string"), "_ref": Value("string"), "_bad": Value("string")})


class PrepareError(UserError):
    """A user-caused problem with the input or options; its message is one line."""


def _iter_lines(files):
    """(line number, file name, stripped text or None when the line is not valid UTF-8) per non-blank line."""
    for path in files:
        name = os.path.basename(path)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, 1):  # binary iteration splits on b"\n" only (not U+2028 etc.)
                try:
                    line = raw.decode("utf-8").strip()
                    if i == 1:
                        line = line.removeprefix("\ufeff").strip()  # a UTF-8 BOM is no part of the first record
                except UnicodeDecodeError:
                    yield i, name, None
                    continue
                if line:
                    yield i, name, line


def _line_gen(files):
    for i, name, line in _iter_lines(files):
        if line is None:
            yield {"_line": "", "_ref": f"{name}:{i}", "_bad": layouts.INVALID_UTF8}
        else:
            yield {"_line": line, "_ref": f"{name}:{i}", "_bad": None}


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())[:500]


def _dir_files(path: str) -> tuple:
    found = sorted(f for f in glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
    jsonl = [f for f in found if f.endswith(JSONL_EXT)]
    parquet = [f for f in found if f.endswith(PARQUET_EXT)]
    return jsonl, parquet


def open_source(source: str, work_dir: str, split: str = "train", config: Optional[str] = None) -> tuple:
    """(dataset, label): a ``_line``/``_ref`` dataset for JSON Lines, else the source's own columns."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        files, kind = [path], ("jsonl" if path.endswith(JSONL_EXT) else "parquet" if path.endswith(PARQUET_EXT) else "")
        if not kind:
            raise PrepareError(f"{source}: unsupported file type (expected .jsonl, .json, .jsonl.gz or .parquet)")
    elif os.path.isdir(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            try:
                ds = load_from_disk(path)
            except Exception as e:  # noqa: BLE001 - reported as one line
                raise PrepareError(f"{source}: cannot load the saved dataset: {_one_line(e)}") from None
            if isinstance(ds, DatasetDict):
                if split not in ds:
                    raise PrepareError(f"{source}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            return ds, source
        jsonl, parquet = _dir_files(path)
        if jsonl:
            files, kind = jsonl, "jsonl"
        elif parquet:
            files, kind = parquet, "parquet"
        else:
            raise PrepareError(f"{source}: no .jsonl, .json or .parquet files in this folder")
    elif source.startswith((".", "/", "~")) or source.endswith(JSONL_EXT + PARQUET_EXT):
        raise PrepareError(f"{source}: no such file or folder")
    else:
        try:
            ds = load_dataset(source, config, split=split)
        except Exception as e:  # noqa: BLE001 - hub/network errors become one line
            raise PrepareError(f"cannot load dataset {source!r} (split {split!r}): {_one_line(e)}") from None
        return ds, source
    cache = os.path.join(work_dir, "load")
    try:
        if kind == "parquet":
            return Dataset.from_parquet(files, cache_dir=cache, split="train"), source
        import datasets

        bars = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a bar for copying lines is noise (and would precede an error line)
        try:
            ds = Dataset.from_generator(
                _line_gen, features=LINE_FEATURES, cache_dir=cache, gen_kwargs={"files": files}, writer_batch_size=256
            )
        finally:
            if bars:
                datasets.enable_progress_bars()
    except PrepareError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable file
        raise PrepareError(f"{source}: cannot read: {_one_line(e)}") from None
    return ds, source


def sample_keys(ds: Dataset, renames: tuple, limit: int = 1000) -> set:
    """Keys of the first ``limit`` parseable rows (columns for Arrow sources)."""
    if "_line" not in ds.column_names:
        row = {c: None for c in ds.column_names}
        return set(layouts.apply_renames(row, renames))
    keys: set = set()
    seen = 0
    for batch in ds.select_columns(["_line"]).iter(batch_size=256):
        for line in batch["_line"]:
            row = layouts.parse_line(line)  # bad rows (including invalid UTF-8: an empty line) have no say
            if isinstance(row, dict):
                keys |= set(layouts.apply_renames(row, renames))
                seen += 1
                if seen >= limit:
                    return keys
    return keys


def detect(ds: Dataset, layout: str, renames: tuple, label: str) -> str:
    if len(ds) == 0:
        raise PrepareError(f"{label}: no rows")
    if layout != "auto":
        return layout
    keys = sample_keys(ds, renames)
    if not keys:
        raise PrepareError(f"{label}: no row is a JSON object: all {len(ds)} rows are malformed (expected JSON Lines)")
    found = layouts.detect_layout(keys)
    if found is None:
        shown = ", ".join(sorted(keys)[:12])
        raise PrepareError(
            f"{label}: cannot tell the layout: rows have {shown}; expected 'generations' (OpenR1) or 'response' "
            "(plain rows); use --rename OLD=NEW or --layout"
        )
    return found
