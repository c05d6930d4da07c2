"""Where training rows come from, each source found through a small registry.

``load_source(path, layout, split)`` returns a ``datasets.Dataset`` with the layout's canonical columns
(``redi_ds.data.layout``):

- ``SFT_ROWS``: ``prompt``, ``response``
- ``PAIRS``:    ``prompt``, ``chosen``, ``rejected``

Accepted field names: ``problem`` or ``prompt`` for the prompt; everything else as named. Every row is
checked: a missing field, a non-string or an empty text is a one-line :class:`DataError` naming the
file, the line (JSONL) or row, and the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from redi_ds.data import conversation
from redi_ds.data.errors import DataError
from redi_ds.data.layout import PAIRS, SFT_ROWS, RowLayout
from redi_ds.textio import iter_jsonl

PROMPT_ALIASES = ("prompt", "problem")


def _plain(row: dict, layout: RowLayout, where: Callable[[str], str]) -> dict:
    out = {}
    for name in layout.fields:
        if name == "prompt":
            key = next((k for k in PROMPT_ALIASES if k in row), None)
            if key is None:
                raise DataError(f"{where('prompt')}: missing field 'prompt' (or 'problem')")
        else:
            key = name
            if key not in row:
                raise DataError(f"{where(key)}: missing field {key!r}")
        value = row[key]
        if not isinstance(value, str):
            raise DataError(f"{where(key)}: field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where(key)}: field {key!r} is empty")
        out[name] = value
    return out


FORMATS = ("auto", "plain", "messages")


class Reader:
    """Turns a source's rows into canonical rows of one layout and one format (``data.format``): plain strings
    (``prompt``, ``response`` / ``chosen``, ``rejected``) or a ``conversation`` (redi_ds.data.conversation).
    ``auto`` decides from the first row; a later row in the other format is a one-line error."""

    def __init__(self, layout: RowLayout, data_format: str = "auto"):
        if data_format not in FORMATS:
            raise DataError(f"data.format = {data_format!r}; expected one of {', '.join(FORMATS)}")
        self.layout, self.format = layout, data_format

    def canonical(self, row: dict, where: Callable[[str], str]) -> dict:
        paired = self.layout is PAIRS
        found = "messages" if conversation.is_conversational(row, paired) else "plain"
        if self.format == "auto":
            self.format = found
        elif found != self.format:
            raise DataError(f"{where('messages' if not paired else 'prompt')}: a {found} row in a source of "
                            f"{self.format} rows (data.format: {self.format})")
        if self.format == "plain":
            return _plain(row, self.layout, where)
        return (conversation.pair_conversation if paired else conversation.sft_conversation)(row, where)


def _jsonl_rows(path: str, reader: Reader) -> list[dict]:
    """Canonical rows of one JSONL file; any bad line (not UTF-8, invalid or too deep JSON, a duplicate key, a lone
    surrogate, a missing or empty field) is a one-line DataError naming the file, the line and the field."""
    rows = []
    for lineno, row, bad in iter_jsonl(path):
        if bad:
            raise DataError(f"{path}:{lineno}: {bad}")
        rows.append(reader.canonical(row, lambda field: f"{path}:{lineno}"))
    return rows


def _from_jsonl(path: str, reader: Reader, split: str):
    import datasets

    rows = _jsonl_rows(path, reader)
    if not rows:
        raise DataError(f"{path}: no rows")
    return datasets.Dataset.from_list(rows)


def _from_jsonl_folder(path: str, reader: Reader, split: str):
    """A folder of .jsonl files (read in name order, each line checked like a single file)."""
    import datasets

    files = sorted(str(f) for f in Path(path).glob("*.jsonl"))
    rows = [r for f in files for r in _jsonl_rows(f, reader)]
    if not rows:
        raise DataError(f"{path}: its .jsonl files hold no rows")
    return datasets.Dataset.from_list(rows)


def _check_dataset(ds, reader: Reader, label: str):
    cols = set(ds.column_names)
    if len(ds) == 0:
        raise DataError(f"{label}: empty (no rows)")
    if reader.format != "plain" and conversation.is_conversational(ds[0], reader.layout is PAIRS):
        where = lambda i: lambda field: f"{label} row {i}"  # noqa: E731
        return ds.map(lambda row, i: reader.canonical(row, where(i)), with_indices=True,
                      remove_columns=ds.column_names, desc=None)
    layout = reader.layout
    for name in layout.fields:
        names = PROMPT_ALIASES if name == "prompt" else (name,)
        if not cols.intersection(names):
            raise DataError(f"{label}: missing field {name!r} (columns: {', '.join(sorted(cols))})")
    prompt_col = next(k for k in PROMPT_ALIASES if k in cols)
    ds = ds.select_columns([prompt_col] + [c for c in layout.fields if c != "prompt"])
    for i, row in enumerate(ds):  # streams through Arrow: validates without holding rows
        reader.canonical(row, lambda field: f"{label} row {i}")
    if prompt_col != "prompt":
        ds = ds.rename_column(prompt_col, "prompt")
    return ds


def _from_disk(path: str, reader: Reader, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - a damaged folder becomes one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DataError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return _check_dataset(ds, reader, path)


def _from_prepared(path: str, reader: Reader, split: str):
    sub = os.path.join(path, reader.layout.name)
    if not os.path.isdir(sub):
        raise DataError(f"{path}: a prepared data folder without {os.path.basename(sub)}/ (run redi_ds.data.prepare)")
    return _from_disk(sub, reader, split)


def _from_files(path: str, reader: Reader, split: str):
    import datasets

    if not path.endswith(".parquet"):
        raise DataError(f"{path}: unsupported file type {Path(path).suffix or '(none)'!r} (expected .jsonl, "
                        ".json, .parquet, a save_to_disk folder, a prepare output folder, or a dataset name)")
    try:
        import pyarrow.parquet as pq

        if pq.ParquetFile(path).metadata.num_rows == 0:
            raise DataError(f"{path}: empty (no rows)")
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or truncated file becomes one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {first})") from None
    return _check_dataset(ds, reader, path)


def _from_hub(path: str, reader: Reader, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/IO failure becomes one line
        raise DataError(f"{path}: not a local file or folder, and loading it as a dataset name failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return _check_dataset(ds, reader, path)


def _from_synthetic(path: str, reader: Reader, split: str, *, size: int = 256, seed: int = 0):
    import datasets

    from redi_ds.data import synthetic

    problems = synthetic.generate(size, seed)
    rows = {SFT_ROWS: synthetic.sft_rows, PAIRS: synthetic.pair_rows}[reader.layout](problems)
    return datasets.Dataset.from_list([reader.canonical(r, lambda f: "synthetic") for r in rows])


SOURCES: dict[str, Callable] = {
    "synthetic": _from_synthetic,
    "jsonl": _from_jsonl,
    "jsonl_folder": _from_jsonl_folder,
    "files": _from_files,
    "prepared": _from_prepared,
    "disk": _from_disk,
    "hub": _from_hub,
}


def detect_source(path: str) -> str:
    if path == "synthetic":
        return "synthetic"
    if os.path.isfile(path):
        return "jsonl" if path.endswith((".jsonl", ".json")) else "files"
    if os.path.isdir(path):
        p = Path(path)
        if any((p / layout.name).is_dir() for layout in (SFT_ROWS, PAIRS)):
            return "prepared"
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return "disk"
        if any(p.glob("*.jsonl")) and not any(p.glob("*.parquet")):
            return "jsonl_folder"
        return "hub"  # a folder of data files: datasets.load_dataset handles it
    if os.sep in path and not path.count("/") == 1:
        raise DataError(f"{path}: no such file or folder")
    return "hub"


def load_source(path: str, layout: RowLayout, split: str = "train", *, synthetic_size: int = 256, seed: int = 0,
                data_format: str = "auto"):
    """Canonical rows of ``layout`` from ``path``: plain strings, or one ``conversation`` JSON column for the
    messages layout (``data_format``: auto, plain, messages)."""
    reader = Reader(layout, data_format)
    name = detect_source(path)
    if name == "synthetic":
        return _from_synthetic(path, reader, split, size=synthetic_size, seed=seed)
    return SOURCES[name](path, reader, split)
