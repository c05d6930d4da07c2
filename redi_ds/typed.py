"""Typed sections from plain mappings: a YAML tree into dataclasses, every value checked, unknown keys refused.

``from_dict(Cls, mapping)`` coerces each value to its field's annotation (bool, int, float, str, lists, dicts,
Optional / Union, nested dataclasses) and raises a one-line ConfigError naming the dotted key. A field whose
``metadata["by_name"]`` names a resolver in ``SECTIONS`` is built by it instead (the loss section: its class is
chosen by the section's ``name``). A dataclass that checks itself in ``__post_init__`` (a ValueError) gets its
message prefixed with where it is.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Union

from redi_ds.errors import ConfigError

SECTIONS: dict[str, Callable[[Any, str], Any]] = {}  # metadata["by_name"] -> resolver(value, where)

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            if isinstance(value, str):  # "a,b" on the command line
                value = [v for v in value.split(",") if v]
            else:
                raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "5e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")





def from_dict(cls: type, data: dict, *, source: str = "", prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = ", ".join(sorted(fields))
            raise ConfigError(f"{source + ': ' if source else ''}unknown key {where!r} (known here: {close})")
        try:
            by_name = fields[key].metadata.get("by_name")
            kwargs[key] = SECTIONS[by_name](value, where) if by_name else _coerce(hints[key], value, where)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(f"{source}: {msg}" if source and not msg.startswith(source) else msg) from None
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section that validates itself (kernel: FusedHeadOptions, a loss's options)
        where = f"{prefix}." if prefix and not str(e).startswith(f"{prefix}.") else ""
        raise ConfigError(f"{source + ': ' if source else ''}{where}{e}") from None
