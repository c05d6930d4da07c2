"""Checkpoints of one stage: complete or absent, never rotated away, never silently stale.

    {stage_dir}/checkpoints/step_N/        a complete DeepSpeed checkpoint (every rank's shards),
                            step_N/meta.json   step, world size, batch sizes (read before loading)
                            step_N/config.yaml the resolved config
                            latest             the newest complete step_N (moved atomically)

- A checkpoint is written as ``step_N.partial`` and renamed to ``step_N`` by rank 0 only after every rank
  has written its shards; ``latest`` moves after the rename. A run killed mid-save leaves only a
  ``.partial`` folder, which the next run removes with a notice: ``latest`` can only name a complete one.
- Rotation (``train.keep_checkpoints``) deletes only this run's older checkpoints: folders with a step
  number above the one just written are never touched.
- A run that does not resume from this stage's own latest checkpoint (``run.resume: never``, or an explicit
  path) first moves the stage's old ``checkpoints/`` aside (``checkpoints.stale-<time>/``, with a notice).
- Before a save every rank checks the free space against the size of the previous checkpoint (or an
  estimate) so that a full disk is a one-line error that leaves the last complete checkpoint in place.

Testing aid: ``REDI_DS_FAULT=kill_during_save:N`` SIGKILLs rank 0 after its shards of step N are written and
before the rename (the crash the rename protects against).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

from redi_ds.config import save_config
from redi_ds.errors import ConfigError, TrainingError
from redi_ds.ranks import is_rank0, log0

PARTIAL = ".partial"


def _step(p: Path) -> Optional[int]:
    name = p.name
    if not name.startswith("step_") or not p.is_dir():
        return None
    try:
        return int(name[len("step_"):])
    except ValueError:
        return None


def _complete(path: Path) -> bool:
    """A step_N folder that a save finished (meta.json; or, written before meta.json existed, model states)."""
    return (path / "meta.json").is_file() or any(path.glob("*model_states.pt"))


def _sizes(path: Path) -> dict[str, int]:
    """Every file of a checkpoint folder and its size (recorded in meta.json, checked before a resume)."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def verify(path: Path) -> bool:
    """A complete checkpoint whose files are all there at the sizes its save recorded (a shard cut short by a
    full disk or a copy does not verify). Checkpoints written before sizes were recorded verify by completeness."""
    if not _complete(path):
        return False
    if not (path / "meta.json").exists():
        return True  # written before meta.json existed: complete is all we can know
    try:
        files = json.loads((path / "meta.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(files, dict):
        return True
    for name, size in files.items():
        f = path / name
        try:
            if f.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CheckpointStore:
    """``checkpoints/`` of one stage directory. Collective methods say so; the rest are rank-local reads."""

    def __init__(self, stage_dir: Path, rank: int):
        self.root = Path(stage_dir).resolve() / "checkpoints"
        self.rank = rank
        self._fallback_said = False

    # -- reads
    def _named(self) -> tuple[Optional[Path], str]:
        """(the step folder ``latest`` names, or None; why not)."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None, "is missing"
        try:
            tag = pointer.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None, "is unreadable"
        path = self.root / tag
        if not tag or "/" in tag or _step(path) is None:
            return None, f"names {tag[:40]!r}, which is no checkpoint here"
        return path, ""

    def latest(self) -> Optional[Path]:
        """The checkpoint to trust: the one ``latest`` names when it verifies, else the newest one that does (said
        once), else None."""
        named, why = self._named()
        if named is not None:
            if verify(named):
                return named
            why = f"names {named.name}, which does not verify (missing or truncated files)"
        steps = sorted(((s, p) for p in self.root.iterdir() if (s := _step(p)) is not None), reverse=True) \
            if self.root.is_dir() else []
        for _, path in steps:
            if verify(path):
                if not self._fallback_said and (named is not None or (self.root / "latest").exists()):
                    log0(f"{self.root / 'latest'} {why}; using the newest checkpoint that verifies: {path}")
                    self._fallback_said = True
                return path
        return None

    @staticmethod
    def meta(path: Path) -> dict:
        try:
            return json.loads((Path(path) / "meta.json").read_text())
        except (OSError, ValueError):
            return {}

    def check_resumable(self, path: Path, world: int, global_batch: int) -> int:
        """The step of checkpoint ``path``; a one-line ConfigError when this run cannot load it."""
        path = Path(path)
        meta = self.meta(path)
        if not _complete(path):
            raise ConfigError(f"run.resume: {path} is not a checkpoint written by redi-ds (no meta.json)")
        if not verify(path):
            raise ConfigError(f"run.resume: {path} does not verify: a file is missing or shorter than when it was "
                              "written (a copy or a full disk cut it)")
        saved = meta.get("world_size")
        if saved is not None and int(saved) != world:  # (another sequence_parallel_size over the same world is fine)
            raise ConfigError(f"run.resume: {path} was written by {saved} ranks and this run has {world}: ZeRO "
                              f"shards are per rank, so resume with {saved} ranks (or run.resume: never)")
        gb = meta.get("global_batch_size")
        if gb is not None and int(gb) != global_batch:
            raise ConfigError(f"run.resume: {path} was trained with train.global_batch_size {gb}, this run has "
                              f"{global_batch}: the data order would not continue (set it back, or run.resume: never)")
        return int(meta.get("step", 0))

    # -- housekeeping (rank 0)
    def clean_partials(self) -> None:
        if self.rank != 0 or not self.root.is_dir():
            return
        for p in sorted(self.root.glob(f"step_*{PARTIAL}")):
            log0(f"removing {p}: an unfinished checkpoint of a run that died while saving")
            shutil.rmtree(p, ignore_errors=True)

    def move_aside(self, why: str) -> None:
        """Rename an existing checkpoints/ to checkpoints.stale-<time>/ (rank 0)."""
        if self.rank != 0 or not self.root.is_dir() or not any(self.root.iterdir()):
            return
        dest = self.root.with_name(f"checkpoints.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        i = 1
        while dest.exists():
            i += 1
            dest = dest.with_name(f"{dest.name.split('~')[0]}~{i}")
        os.replace(self.root, dest)
        log0(f"moved the stage's earlier checkpoints to {dest} ({why}); delete it when you no longer need it")

    # -- writes (collective)
    def save(self, engine, cfg, step: int, world: int) -> Path:
        """Write step_N (complete or absent), move ``latest``, rotate. Collective: every rank calls it."""
        import torch.distributed as dist

        tag = f"step_{step}"
        partial, final = self.root / f"{tag}{PARTIAL}", self.root / tag
        self._check_space(engine, step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=partial.name, client_state={"step": step},
                                   save_latest=False, exclude_frozen_parameters=cfg.model.lora.r > 0)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise TrainingError(self._write_failed(tag, e), local=True) from None
        _fault("kill_during_save", step)
        dist.barrier()  # every rank's shards are on disk: their sizes go into meta.json
        if self.rank == 0:
            try:
                save_config(cfg, partial / "config.yaml")
                meta = {"step": step, "world_size": world, "global_batch_size": cfg.train.global_batch_size,
                        "sequence_parallel_size": cfg.deepspeed.sequence_parallel_size,
                        "micro_batch_size": cfg.train.micro_batch_size, "stage": cfg.stage,
                        "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": _sizes(partial)}
                (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
                if final.exists():  # an older copy of the same step (never the one `latest` names mid-save)
                    shutil.rmtree(final)
                os.replace(partial, final)
                tmp = self.root / "latest.tmp"
                tmp.write_text(tag)
                os.replace(tmp, self.root / "latest")
            except OSError as e:
                raise TrainingError(self._write_failed(tag, e), local=True) from None
            self._rotate(step, cfg.train.keep_checkpoints)
            log0(f"checkpoint {final} ({_du(final) / 2**20:.0f} MiB)")
        dist.barrier()
        return final

    def _rotate(self, step: int, keep: int) -> None:
        if keep <= 0:
            return
        mine = sorted((s, p) for p in self.root.iterdir() if (s := _step(p)) is not None and s <= step)
        for _, old in mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _check_space(self, engine, step: int) -> None:
        """Every rank: is there room for one more checkpoint? (all ranks agree)"""
        from redi_ds.distributed import every_rank

        previous = self.latest()
        if previous is not None:
            need = _du(previous)
        else:  # fp32 master + Adam's two moments + the compute copy, for this rank's share of the parameters
            numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
            need = int(numel * 16 * 1.05)
        probe = self.root if self.root.exists() else self.root.parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if not every_rank(free >= need):
            last = self.latest()
            raise TrainingError(
                f"disk full: checkpoint step_{step} needs about {need / 2**20:.0f} MiB in {self.root} and "
                f"{'this' if free < need else 'another'} rank has {free / 2**20:.0f} MiB free; "
                f"the last complete checkpoint is {last or 'none'} (free space and rerun the same command to resume)")

    def _write_failed(self, tag: str, e: BaseException) -> str:
        free = shutil.disk_usage(self.root.parent if not self.root.exists() else self.root).free
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        full = " (disk full)" if free < 2**20 * 16 or "No space" in str(e) or "write failed" in str(e) else ""
        return (f"checkpoint {tag} could not be written to {self.root}{full}: {first}; {free / 2**20:.0f} MiB free; "
                f"the last complete checkpoint is {self.latest() or 'none'}")


def _fault(name: str, step: int) -> None:
    """The testing aid of the module docstring (REDI_DS_FAULT=name:step)."""
    spec = os.environ.get("REDI_DS_FAULT", "")
    if spec == f"{name}:{step}" and is_rank0():
        os.kill(os.getpid(), signal.SIGKILL)
