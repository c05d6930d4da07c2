"""Process-level pieces of a run: the process group, the device, stop requests, and the stage lock.

Every decision that all ranks must share (stop now? is the stage dir free?) is taken by an all-reduce, so no rank
can go on while another stops.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Optional

import torch

from redi_ds.errors import ConfigError


def init_distributed():
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


class StopRequest:
    """Preemption, agreed on by all ranks at step boundaries: SIGUSR1 / SIGTERM, $REDI_DS_STOP_FILE appearing, or
    the launcher gone (see ``LauncherWatch``): a worker whose launcher died checkpoints and stops rather than train
    on unsupervised."""

    def __init__(self):
        self.flag = False
        self.file = os.environ.get("REDI_DS_STOP_FILE")
        self.launcher = LauncherWatch()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        gone = self.launcher.gone()
        if gone and not self.flag:
            print(f"[redi-ds] rank {os.environ.get('RANK', '0')}: {gone}; checkpointing and stopping", flush=True)
        return any_rank(self.flag or bool(gone) or bool(self.file and os.path.exists(self.file)))


def _ppid_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LauncherWatch:
    """Whether this worker's launcher is gone. Its parent dying (torchrun's agent, DeepSpeed's launch.py) is caught
    by the kernel (PR_SET_PDEATHSIG: SIGTERM, the preemption signal) and by the parent pid changing. Under the
    ``deepspeed`` command the parent, ``deepspeed.launcher.launch``, survives a SIGTERM to the command itself and
    would let its workers train on: so its own parent (the ``deepspeed`` runner) is watched too (Linux /proc)."""

    def __init__(self):
        self.parent = os.getppid()
        by_deepspeed = "deepspeed.launcher.launch" in _cmdline(self.parent)
        # only under a launcher: a plain `python launch/train.py` (under nohup, say) outlives its shell as before
        self.active = by_deepspeed or "TORCHELASTIC_RUN_ID" in os.environ
        self.grandparent = _ppid_of(self.parent) if by_deepspeed else None
        if self.active:
            try:  # the kernel sends SIGTERM (the preemption signal) to this process when its parent dies
                import ctypes

                ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass

    def gone(self) -> str:
        if not self.active:
            return ""
        if os.getppid() != self.parent:
            return f"the launcher (pid {self.parent}) is gone"
        if self.grandparent is not None and _ppid_of(self.parent) != self.grandparent:
            return f"the deepspeed command (pid {self.grandparent}) is gone"
        return ""


class StageLock:
    """An exclusive lock on a stage directory, held by global rank 0 for the whole run (all ranks agree)."""

    def __init__(self, fd: Optional[int]):
        self.fd = fd

    @classmethod
    def acquire(cls, stage_dir: Path, rank: int) -> "StageLock":
        import fcntl


        fd, holder = None, ""
        if rank == 0:
            stage_dir.mkdir(parents=True, exist_ok=True)
            path = stage_dir / ".lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
                         .encode())
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                fd = None
            except OSError:  # a file system without flock: run unlocked rather than not at all
                pass
        if any_rank(bool(holder)):
            raise ConfigError(f"{stage_dir} is in use by another run ({holder or 'see rank 0'}); wait for it to end, "
                              f"or set run.output_dir to another folder")
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _agree(local: bool, op: str) -> bool:
    """One all-reduce of a flag on this rank's device (NCCL needs CUDA tensors), the same answer on every rank."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if local else 0.0], device=current_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return bool(t.item() > 0)


def any_rank(local: bool) -> bool:
    """True on every rank when it is true on at least one (stop now? is the stage dir busy?)."""
    return _agree(local, "MAX")


def every_rank(local: bool) -> bool:
    """True on every rank when it is true on all of them (finite weights? room for a checkpoint?)."""
    return _agree(local, "MIN")


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def params_finite(engine) -> bool:
    """Every rank checks its own partition (ZeRO-3: ds_tensor); all ranks agree."""
    ok = True
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not bool(torch.isfinite(t).all()):
            ok = False
            break
    return every_rank(ok)
