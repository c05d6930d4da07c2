"""Which process this is, before or without a process group: the launcher's RANK / WORLD_SIZE variables.

One place reads them; rank 0 (or a run with no launcher) is the process that prints and writes shared files.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def log0(msg: str) -> None:
    """A progress line, printed once (by global rank 0)."""
    if is_rank0():
        print(f"[redi-ds] {msg}", flush=True)
