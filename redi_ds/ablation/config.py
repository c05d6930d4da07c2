"""The ablation's typed config: YAML (``redi_ds/configs/ablation-*.yaml``) with ``quick`` / ``smoke`` sizes.

    recipe: arith                # the training config every run derives from (its stages: sft, redi, dpo, simpo)
    seeds: 3                     # stage-2 seeds (data order); the base is one SFT model
    task: {...}                  # redi_ds.ablation.task.TaskConfig (generated data); or data: {...} (paths)
    base: {train.epochs: 40}     # dotted overrides of the recipe's sft stage for the base
    negatives: {samples: 4}      # redi_ds.eval.EvalOptions for sampling the student's negatives
    eval: {max_new_tokens: 40}   # redi_ds.eval.EvalOptions for scoring (greedy by default)
    probe: {pairs: 256, every: 10}
    sweep: true                  # choose each branch's LR on the validation set (first seed), else lrs[0]
    branches:
      redi-0.8: {stage: redi, data: student, lrs: [1e-4, 3e-5], overrides: {loss.alpha: 0.8}}
    quick: {seeds: 2, ...}       # merged over the rest with --quick (and smoke: with --smoke)

Unknown keys and wrong types are one-line errors naming the file (the same machinery as redi_ds.config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from redi_ds.ablation.task import TaskConfig
from redi_ds.config import _deep_merge
from redi_ds.typed import from_dict
from redi_ds.errors import ConfigError
from redi_ds.eval.options import EvalOptions

DATA_KINDS = ("stage2", "student", "teacher")


@dataclass
class BranchConfig:
    stage: str = "redi"  # a stage of the recipe: its loss and defaults
    data: str = "student"  # stage2 (continued SFT on the stage-2 positives) | student | teacher (pairs)
    lrs: list[float] = field(default_factory=list)  # candidates; without a sweep the first is used
    overrides: dict = field(default_factory=dict)  # dotted overrides of the recipe, e.g. {loss.alpha: 1.0}


@dataclass
class DataPaths:
    """Where a paper-scale ablation reads its data (the tiny one generates it: ``task``)."""

    sft: str = ""       # stage 1 (a prepared folder's sft/, a JSONL...)
    stage2: str = ""    # stage-2 positives for continued SFT
    teacher: str = ""   # stage-2 pairs with the teacher's incorrect traces
    val: str = ""       # a --bench set for choosing hyperparameters
    test: str = ""      # the held-out --bench set of the report
    probe: str = ""     # held-out pairs (prompt, chosen, rejected) for the log-prob curves


@dataclass
class ProbeConfig:
    pairs: int = 256  # held-out pairs whose log-probs are tracked
    every: int = 10  # optimizer steps between probes in stage 2
    base_every: int = 200  # ... in stage 1 (the base's curve shows whether it has plateaued); 0: none


@dataclass
class AblationConfig:
    recipe: str = "arith"
    seeds: int = 3
    task: Optional[TaskConfig] = field(default_factory=TaskConfig)
    data: DataPaths = field(default_factory=DataPaths)
    base: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)  # dotted overrides common to every branch
    negatives: EvalOptions = field(default_factory=lambda: EvalOptions(samples=4, temperature=1.0, top_p=1.0))
    eval: EvalOptions = field(default_factory=lambda: EvalOptions(samples=1, temperature=0.0))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    sweep: bool = True
    branches: dict = field(default_factory=dict)  # name -> BranchConfig
    reference: str = "sft"  # the branch claim 1 compares REDI against
    quick: dict = field(default_factory=dict)
    smoke: dict = field(default_factory=dict)

    def branch(self, name: str) -> BranchConfig:
        return self.branches[name]


def ablation_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("redi_ds.configs").iterdir()
                  if p.name.startswith("ablation-") and p.name.endswith(".yaml"))


def load_ablation(name_or_path: str, size: str = "full", overrides: Optional[dict] = None) -> AblationConfig:
    """The resolved ablation config; ``size``: full | quick | smoke (the file's section merged over it)."""
    if Path(name_or_path).is_file():
        source, text = name_or_path, Path(name_or_path).read_text(encoding="utf-8")
    else:
        res = resources.files("redi_ds.configs").joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise ConfigError(f"ablation config {name_or_path!r}: no such file and no bundled one "
                              f"(bundled: {', '.join(ablation_names())})")
        source, text = f"redi_ds/configs/{name_or_path}.yaml", res.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or "ablation" not in raw:
        raise ConfigError(f"{source}: expected a top-level 'ablation' section")
    tree = raw["ablation"]
    if size != "full":
        tree = _deep_merge(tree, tree.get(size) or {})
    tree = _deep_merge(tree, overrides or {})
    cfg = from_dict(AblationConfig, tree, source=source)
    cfg.branches = {name: from_dict(BranchConfig, b or {}, source=source, prefix=f"branches.{name}")
                    for name, b in cfg.branches.items()}
    _validate(cfg, source)
    return cfg


def _validate(cfg: AblationConfig, source: str) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if cfg.seeds < 1:
        fail(f"seeds = {cfg.seeds}; must be >= 1")
    if not cfg.branches:
        fail("branches is empty")
    for name, b in cfg.branches.items():
        if b.data not in DATA_KINDS:
            fail(f"branches.{name}.data = {b.data!r}; expected one of {', '.join(DATA_KINDS)}")
        if not b.lrs or any(not lr > 0 for lr in b.lrs):
            fail(f"branches.{name}.lrs must list learning rates > 0")
    if cfg.reference not in cfg.branches:
        fail(f"reference = {cfg.reference!r} is not a branch")
    if cfg.task is None and not (cfg.data.sft and cfg.data.test):
        fail("give either task (generated data) or data.sft and data.test")
    for what, opts in (("negatives", cfg.negatives), ("eval", cfg.eval)):
        try:
            opts.check()
        except Exception as e:  # noqa: BLE001 - EvalError, one line
            fail(f"{what}: {e}")
