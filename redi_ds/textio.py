"""Reading users' files and checking their paths without a traceback: one place for every reader.

- ``parse_json_line``: one JSON Lines record from raw bytes. Not UTF-8, invalid or too deeply nested JSON, a
  duplicate key, a lone surrogate escape (``"\\ud800"``, which no tokenizer or Arrow can encode) or a value that is
  not an object raise :class:`BadLine` with a short reason; a UTF-8 BOM on the first line is accepted. Callers turn
  it into their own one-line error naming the file and line, or count the row as bad.
- ``load_yaml``: YAML where a duplicate key, a non-UTF-8 byte or absurd nesting is a one-line ConfigError.
- ``writable_dir``: a folder a run or a command will write, checked before any work: not under a file, not on a
  virtual file system, writable.

Pure Python: importing it costs nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from redi_ds.errors import ConfigError

BOM = "\ufeff"
VIRTUAL_FS = ("/proc", "/sys", "/dev")


class BadLine(ValueError):
    """A record that cannot be read; ``str(e)`` is the short reason (no file or line: the caller adds them) and
    ``code`` a stable name for counting it (prepare's stats.json)."""

    def __init__(self, reason: str, code: str):
        super().__init__(reason)
        self.code = code


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise BadLine(f"duplicate key {key!r}", "duplicate_key")
        out[key] = value
    return out


def lone_surrogate(value: Any, field: str = "") -> Optional[str]:
    """The field (dotted) of the first string that holds a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return field or "(value)"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            hit = lone_surrogate(v, f"{field}.{k}" if field else str(k))
            if hit:
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            hit = lone_surrogate(v, f"{field}[{i}]")
            if hit:
                return hit
    return None


def parse_json(text: str) -> Any:
    """json.loads, with duplicate keys, absurd nesting and lone surrogates as BadLine."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise BadLine(f"invalid JSON ({e.msg} at column {e.colno})", "invalid_json") from None
    except RecursionError:
        raise BadLine("JSON nested too deeply", "invalid_json") from None
    field = lone_surrogate(value)
    if field:
        raise BadLine(f"field {field!r} holds a lone surrogate escape (e.g. \\ud800), which is not text",
                      "lone_surrogate")
    return value


def parse_json_line(raw: bytes, first: bool = False) -> dict:
    """One JSON Lines record (a JSON object) from its raw bytes."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})", "invalid_utf8") from None
    if first and line.startswith(BOM):
        line = line[1:]
    row = parse_json(line)
    if not isinstance(row, dict):
        raise BadLine(f"expected a JSON object, got {type(row).__name__}", "not_an_object")
    return row


def iter_jsonl(path: str) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """(line number, record, None) or (line number, None, reason) for every non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip() or (lineno == 1 and raw.strip() == BOM.encode()):
                continue
            try:
                yield lineno, parse_json_line(raw, first=lineno == 1), None
            except BadLine as e:
                yield lineno, None, str(e)


# ----------------------------------------------------------------------------- YAML


def load_yaml(data: bytes, source: str) -> Any:
    """YAML from raw bytes; a non-UTF-8 byte, invalid YAML, a duplicate key or absurd nesting is one line."""
    import yaml

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 (byte {data[e.start]:#04x})") from None

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: duplicate key {key!r} (first at line "
                                  f"{seen[key]}); a second value would silently win")
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text.removeprefix(BOM), Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None


# ----------------------------------------------------------------------------- paths


def writable_dir(path: str, what: str) -> Path:
    """Check a folder that will be written, before any work and without creating it: not a file or under one, not
    on a virtual file system, and writable where it will be created (a probe file in its nearest existing folder).
    A one-line ConfigError otherwise."""
    p = Path(path).expanduser().absolute()
    real = Path(os.path.realpath(p))
    if any(str(real) == v or str(real).startswith(v + os.sep) for v in VIRTUAL_FS):
        raise ConfigError(f"{what} = {path!r} is on a virtual file system ({real}); choose a real folder")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == p else f"is under {probe}, which is a file"
        raise ConfigError(f"{what} = {path!r} {where}, not a folder")
    test = probe / f".redi-ds-write-test-{os.getpid()}"
    try:
        test.write_bytes(b"")
        test.unlink()
    except OSError as e:
        raise ConfigError(f"{what} = {path!r} cannot be written ({e.strerror or type(e).__name__} in {probe})"
                          ) from None
    return p
