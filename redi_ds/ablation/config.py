"""The ablation's typed config: YAML (``redi_ds/configs/ablation-*.yaml``) with ``quick`` / ``smoke`` sizes.

    recipe: arith                # the training config every run derives from (its stages: sft, redi, dpo, simpo)
    bases: 2                     # independently trained SFT bases; seeds: 3 stage-2 seeds per base
    task: {...}                  # redi_ds.ablation.task.TaskConfig (generated data); or data: {...} (paths)
    teacher: {model.tiny.num_hidden_layers: 6}   # dotted overrides of the recipe's sft stage for the teacher
    teacher_segments: 8, teacher_target: 0.8     # its parts; the first part at 80% validation pass@1 is the teacher
    base: {train.epochs: 12}     # ... for each base; base_segments: its validation curve's points
    eval / sampled: {...}        # redi_ds.eval.EvalOptions: greedy, and sampled pass@1 (k samples)
    rules: {metric: sampled, alpha: 0.05, margin: 0.02}   # the decision rules (redi_ds.ablation.stats)
    branches:
      redi-0.8: {stage: redi, data: teacher, lrs: [1e-4, 3e-4, 1e-3], overrides: {loss.alpha: 0.8}}
    claims:
      "1": {text: "...", source: "...", a: redi-0.8, b: [sft]}
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

DATA_KINDS = ("stage2", "teacher", "student", "rft")
SECTIONS = ("paper", "student")
CLAIM_KINDS = ("beats", "stability")
METRICS = ("sampled", "greedy")


@dataclass
class BranchConfig:
    stage: str = "redi"  # a stage of the recipe: its loss and defaults
    # stage2: continued SFT on the teacher's positives of the stage-2 problems | teacher: the teacher's pairs |
    # student: the teacher's positive against the base's own wrong sample | rft: the base's correct samples
    # plus the teacher's positives (rejection-sampling SFT)
    data: str = "teacher"
    lrs: list[float] = field(default_factory=list)  # the LR grid; with one LR and no grid, no sweep
    grid: list[dict] = field(default_factory=list)  # variants (dotted overrides) chosen with the LR on validation
    lr_from: str = ""  # take another branch's validated LR and variant instead of a sweep
    overrides: dict = field(default_factory=dict)  # dotted overrides of the recipe, e.g. {loss.alpha: 1.0}
    section: str = "paper"  # paper (the paper's setting) | student (this project's student-negative finding)


@dataclass
class ClaimConfig:
    text: str = ""    # the claim, in the paper's words
    source: str = ""  # where the paper says it
    kind: str = "beats"  # beats: branch ``a`` beats every branch of ``b`` | stability: REDI alpha 1.0 vs 0.8
    a: str = ""
    b: list[str] = field(default_factory=list)
    section: str = "paper"


@dataclass
class RulesConfig:
    """The decision rules (redi_ds.ablation.stats), fixed before the run."""

    metric: str = "sampled"  # the primary metric, of the verdicts and the LR choice: sampled pass@1 | greedy
    alpha: float = 0.05
    margin: float = 0.02  # equivalence margin, accuracy as a fraction
    collapse_nats: float = 0.1
    extend_grid: int = 1  # times an LR optimum at a grid edge extends the grid by one step before it is flagged


@dataclass
class DataPaths:
    """Where a paper-scale ablation reads its data (the tiny one generates it: ``task``)."""

    sft: str = ""       # stage 1 (a prepared folder's sft/, a JSONL...)
    stage2: str = ""    # stage-2 positives for continued SFT
    teacher: str = ""   # stage-2 pairs with the teacher's incorrect traces
    val: str = ""       # a --bench set for choosing hyperparameters
    test: str = ""      # the held-out --bench set of the report
    probe: str = ""     # held-out pairs (prompt, chosen, rejected[, kind]) for the log-prob curves


@dataclass
class ProbeConfig:
    every: int = 10  # optimizer steps between probes in stage 2
    base_every: int = 0  # ... in stage 1; 0: none


@dataclass
class AblationConfig:
    recipe: str = "arith"
    bases: int = 2  # independently trained SFT bases (init and data order: run.seed = base index)
    seeds: int = 3  # stage-2 seeds (data order) per base
    sweep_seed: int = 100  # the seed of the validation runs that choose each branch's LR (not a test seed)
    task: Optional[TaskConfig] = field(default_factory=TaskConfig)
    data: DataPaths = field(default_factory=DataPaths)
    teacher: dict = field(default_factory=dict)  # dotted overrides of the recipe's sft stage: a larger model
    teacher_segments: int = 1  # the teacher trains in this many equal parts, scored on validation after each
    teacher_target: float = 0.0  # ... and is the first part whose sampled pass@1 reaches this (0: all its epochs)
    teacher_samples: EvalOptions = field(default_factory=lambda: EvalOptions(samples=4, temperature=1.0, top_p=1.0))
    base: dict = field(default_factory=dict)  # dotted overrides of the recipe's sft stage for each base
    base_segments: int = 1  # the base trains in this many equal parts, scored on validation after each (the curve)
    stage2: dict = field(default_factory=dict)  # dotted overrides common to every branch
    student_samples: EvalOptions = field(default_factory=lambda: EvalOptions(samples=4, temperature=1.0, top_p=1.0))
    eval: EvalOptions = field(default_factory=lambda: EvalOptions(samples=1, temperature=0.0))
    sampled: EvalOptions = field(default_factory=lambda: EvalOptions(samples=4, temperature=1.0, top_p=1.0))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    branches: dict = field(default_factory=dict)  # name -> BranchConfig
    claims: dict = field(default_factory=dict)  # key -> ClaimConfig
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
    cfg.claims = {str(key): from_dict(ClaimConfig, c or {}, source=source, prefix=f"claims.{key}")
                  for key, c in cfg.claims.items()}
    _validate(cfg, source)
    return cfg


def _validate(cfg: AblationConfig, source: str) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if min(cfg.seeds, cfg.bases, cfg.base_segments, cfg.teacher_segments) < 1:
        fail(f"bases, seeds, base_segments and teacher_segments must be >= 1 (got {cfg.bases}, {cfg.seeds}, "
             f"{cfg.base_segments}, {cfg.teacher_segments})")
    if not 0 <= cfg.teacher_target <= 1:
        fail(f"teacher_target = {cfg.teacher_target}; expected an accuracy in [0, 1] (0: train all its epochs)")
    if cfg.sweep_seed in range(cfg.seeds):
        fail(f"sweep_seed = {cfg.sweep_seed} is a test seed (0..{cfg.seeds - 1}); choose LRs with another seed")
    if not cfg.branches:
        fail("branches is empty")
    for name, b in cfg.branches.items():
        where = f"branches.{name}"
        if b.data not in DATA_KINDS:
            fail(f"{where}.data = {b.data!r}; expected one of {', '.join(DATA_KINDS)}")
        if b.section not in SECTIONS:
            fail(f"{where}.section = {b.section!r}; expected one of {', '.join(SECTIONS)}")
        if b.lr_from:
            if b.lr_from not in cfg.branches or cfg.branches[b.lr_from].lr_from:
                fail(f"{where}.lr_from = {b.lr_from!r} is not a branch with its own LR")
        elif not b.lrs or any(not lr > 0 for lr in b.lrs):
            fail(f"{where}.lrs must list learning rates > 0 (or lr_from name a branch)")
        if any(not isinstance(v, dict) for v in b.grid):
            fail(f"{where}.grid must list mappings of dotted overrides")
    if cfg.rules.metric not in METRICS:
        fail(f"rules.metric = {cfg.rules.metric!r}; expected one of {', '.join(METRICS)}")
    if not (0 < cfg.rules.alpha < 0.5 and cfg.rules.margin >= 0 and cfg.rules.extend_grid >= 0):
        fail("rules: need 0 < alpha < 0.5, margin >= 0 and extend_grid >= 0")
    for key, c in cfg.claims.items():
        if c.kind not in CLAIM_KINDS:
            fail(f"claims.{key}.kind = {c.kind!r}; expected one of {', '.join(CLAIM_KINDS)}")
        named = [c.a, *c.b] if c.kind == "beats" else ["redi-1.0", "redi-0.8"]
        missing = [n for n in named if n not in cfg.branches]
        if missing or not c.text or (c.kind == "beats" and not c.b):
            fail(f"claims.{key}: needs text, and a and b naming branches (unknown: {', '.join(missing) or '-'})")
    if cfg.task is not None and cfg.task.procedures not in ("any", "two"):
        fail(f"task.procedures = {cfg.task.procedures!r}; expected any or two")
    if cfg.task is None and not (cfg.data.sft and cfg.data.test):
        fail("give either task (generated data) or data.sft and data.test")
    for what in ("teacher_samples", "student_samples", "eval", "sampled"):
        try:
            getattr(cfg, what).check()
        except Exception as e:  # noqa: BLE001 - EvalError, one line
            fail(f"{what}: {e}")
