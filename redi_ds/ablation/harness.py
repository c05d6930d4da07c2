"""The experiment: a teacher, its graded samples, SFT bases, stage-2 branches over bases and seeds, paired scores.

    data      the task's gold problems (generated), or the config's paths (a paper-scale ablation)
    teacher   a larger model trained on gold traces in ``teacher_segments`` parts, scored on validation after each;
              the first part whose sampled pass@1 reaches ``teacher_target`` is the teacher (its strength, fixed
              by a rule before the run); sampled at temperature 1 and graded (redi_ds.ablation.traces)
    bases     ``bases`` SFT models on the teacher's correct traces, each scored on validation after every
              ``base_segments`` part of its training (the plateau curve)
    student   each base's own samples on the stage-2 problems (the student-negative section and its RFT control)
    sweep     each branch's LR (and grid variant) chosen on validation with ``sweep_seed`` on base 0; an optimum
              at a grid edge extends the grid (``rules.extend_grid``) or is flagged
    branches  every branch x base x seed, same steps and schedule; scored on the test set, greedy and sampled
    report    results.json (with the preregistration: the config's commit), summary.md, plots

Every run is the trainer's own ``train(cfg)`` in this process; a finished run or score is reused when ``--out``
already holds it, so an interrupted ablation resumes. Scores come from ``run_eval`` with the options of the
recorded ``python -m redi_ds.eval`` command. MLflow: a parent run for the ablation, a child per training run.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from redi_ds.ablation.config import AblationConfig
from redi_ds import ranks
from redi_ds.ranks import log0


class Preempted(Exception):
    """A stop request (SIGUSR1 / SIGTERM / the stop file) ended a training run at a checkpoint."""


@dataclass
class Paths:
    sft: str
    stage2: str
    teacher: str
    val: str
    test: str
    probe: str


@dataclass
class Score:
    accuracy: float
    correct: dict  # problem id -> fraction of samples correct
    out: str


@dataclass
class RunRecord:
    branch: str
    base: int
    seed: int
    lr: float
    export: str
    stage_dir: str
    variant: int = 0
    scores: dict = field(default_factory=dict)  # "val" | "test" | "test-sampled" ... -> Score


@dataclass
class Choice:
    """A branch's validated hyperparameters."""

    lr: float
    variant: int
    bracketed: bool
    table: dict  # "lr|variant" -> validation accuracy


class Ablation:
    def __init__(self, cfg: AblationConfig, out: Path, name: str, size: str, command: str, source: str = ""):
        self.cfg, self.out, self.name, self.size, self.command = cfg, Path(out).resolve(), name, size, command
        self.source = source or name  # the config: a bundled name or a YAML path (its commit is the preregistration)
        self.rank, self.world = ranks.rank(), ranks.world_size()
        self.uri = f"sqlite:///{self.out}/mlflow.db"
        self.parent_run: Optional[str] = None
        self.info: dict = {}  # teacher and student data stats, the base curves

    # ------------------------------------------------------------------------- the whole experiment
    def run(self) -> dict:
        from redi_ds.ablation import report

        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # the markers launch/slurm/train.sbatch reads (as a stage's)
            for marker in ("preempted", "done"):
                (self.out / marker).unlink(missing_ok=True)
        tracker = self._start_parent()
        try:
            paths = self._timed("data", self.prepare_data)
            bases = self._timed("bases", lambda: [self.train_base(b, paths) for b in range(self.cfg.bases)])
            student = self._timed("student", self.student_samples, bases, paths)
            choices = self._timed("sweep", self.choose, bases[0], student, paths)
            runs = self._timed("branches", self.train_branches, bases, student, paths, choices)
            results = report.results(self, bases, runs, choices, paths)
            self._add_time("total", time.time() - t0)
            results["timings_s"] = self._cumulative_timings()
            if self.rank == 0:
                for f in report.write(self.out, results):
                    tracker.log_artifact(str(f))
                tracker.log_metrics(report.parent_metrics(results), step=0)
                (self.out / "done").write_text("ok\n")
            tracker.finish()
            return results
        except Preempted:
            if self.rank == 0:
                (self.out / "preempted").write_text("a training run stopped at a checkpoint\n")
            tracker.finish("KILLED")
            raise
        except BaseException:
            tracker.finish("FAILED")
            raise

    def _cumulative_timings(self) -> dict:
        """Seconds per phase summed over every invocation on this --out (timings.json is written as each phase
        ends, so an invocation that stops or fails still counts its finished phases and the one it stopped in)."""
        path = self.out / "timings.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _timed(self, what: str, fn, *args):
        t = time.time()
        try:
            return fn(*args)
        finally:
            self._add_time(what, time.time() - t)

    def _add_time(self, what: str, seconds: float) -> None:
        if self.rank == 0:
            path = self.out / "timings.json"
            prior = json.loads(path.read_text()) if path.exists() else {}
            prior[what] = round(prior.get(what, 0.0) + seconds, 1)
            path.write_text(json.dumps(prior, indent=1) + "\n")

    # ------------------------------------------------------------------------- data: the teacher
    def prepare_data(self) -> Paths:
        """The task's gold files, the teacher, and its graded samples (or the config's paths)."""
        from redi_ds.ablation import task, traces

        cfg = self.cfg
        if cfg.task is None:
            d = cfg.data
            return Paths(sft=d.sft, stage2=d.stage2 or d.sft, teacher=d.teacher, val=d.val or d.test, test=d.test,
                         probe=d.probe)
        data_dir = self.out / "data"
        gold = {k: str(data_dir / f"{k}.jsonl") for k in ("teacher", "sft_problems", "stage2_problems", "val",
                                                           "test")}
        if self.rank == 0 and not Path(gold["test"]).exists():
            task.write(cfg.task, data_dir)
        _barrier()
        export, curve = self._train_in_parts("teacher", self.out / "teacher", {"data.path": gold["teacher"],
                                             **cfg.teacher}, cfg.teacher_segments, gold["val"], cfg.teacher_target)
        log0("teacher: " + teacher_words(curve, cfg.teacher_target))
        stats_file = data_dir / "stats.json"
        if not stats_file.exists():
            rows = {split: _read_jsonl(gold[f"{split}_problems" if split != "val" else "val"])
                    for split in ("sft", "stage2", "val")}
            samples = {split: self.sample(export, r, cfg.teacher_samples) for split, r in rows.items()}
            if self.rank == 0:
                traces.teacher_data(rows, samples, data_dir)
            _barrier()
        self.info["teacher"] = json.loads(stats_file.read_text()) | {"curve": curve, "target": cfg.teacher_target}
        t = self.info["teacher"]
        log0(f"teacher: {100 * t['stage2']['accuracy']:.1f}% of its samples right on the stage-2 problems; "
             f"{t['sft']['kept']} sft traces, {t['stage2']['pairs']} stage-2 pairs, {t['val']['pairs']} probe pairs")
        return Paths(sft=str(data_dir / "sft.jsonl"), stage2=str(data_dir / "stage2.jsonl"),
                     teacher=str(data_dir / "teacher_pairs.jsonl"), val=gold["val"], test=gold["test"],
                     probe=str(data_dir / "probe_pairs.jsonl"))

    def sample(self, export: str, rows: list[dict], opts) -> list:
        """Graded samples of an export on problems (rank 0 samples; every rank gets them)."""
        from redi_ds.data.negatives import sample_graded

        out = None
        if self.rank == 0:
            out = sample_graded(export, [r["problem"] for r in rows], [r["answer"] for r in rows],
                                replace(opts, system_prompt=self._system_prompt), progress=False)
        return _broadcast_obj(out)

    # ------------------------------------------------------------------------- training runs
    def _train(self, stage: str, out_dir: Path, settings: dict, tags: dict) -> Any:
        from redi_ds.config import load_config
        from redi_ds.trainer import train

        base = {"run.output_dir": str(out_dir), "run.name": f"{self.name}/{tags['branch']}",
                "tracking.uri": self.uri, "tracking.experiment": f"{self.name}-{self.size}",
                "tracking.parent_run_id": self.parent_run, "tracking.tags": tags}
        cfg = load_config(self.cfg.recipe, stage=stage, settings=base | settings)
        result = train(cfg)
        if result.status == "preempted":  # a stop request: every run so far is kept; the same command resumes
            raise Preempted(f"stopped early in {result.stage_dir}; rerun the same command to resume")
        return result

    def _train_in_parts(self, name: str, out: Path, settings: dict, parts: int, val: str, target: float = 0.0,
                        metric: str = "sampled") -> tuple[str, list]:
        """An SFT run trained in ``parts`` equal parts of its epochs (the same run resumed with more epochs), its
        export scored on validation after each: ``(export, [(epochs, accuracy), ...])``. With a ``target`` it
        stops after the first part whose accuracy reaches it (the teacher's strength rule)."""
        from redi_ds.config import load_config

        epochs = load_config(self.cfg.recipe, stage="sft", settings=settings).train.epochs
        export, curve = str(out / "sft" / "export"), []
        for part in range(1, parts + 1):
            at = max(1, round(epochs * part / parts))
            seg = {"train.epochs": at} if part < parts else {}
            if not (part < parts and Path(out, "curve", f"part{part}", "summary.json").exists()):
                export = self._train("sft", out, settings | seg, {"branch": name, "seed": "-"}).export
            rec = RunRecord(name, 0, 0, 0.0, export, str(out / "sft"))
            curve.append((at, self.score(rec, "val", val, metric, where=f"curve/part{part}", root=out).accuracy))
            if target and curve[-1][1] >= target:
                break
        return export, curve

    def train_base(self, b: int, paths: Paths) -> RunRecord:
        """Base ``b`` (run.seed b), trained in ``base_segments`` parts of its epochs, scored on validation after
        each part (the plateau curve; the last part is the base)."""
        settings = {"data.path": paths.sft, "run.seed": b, **self.cfg.base}
        if paths.probe and self.cfg.probe.base_every:
            settings |= {"eval.heldout_pairs": paths.probe, "eval.heldout_every": self.cfg.probe.base_every}
        out = self.out / f"base{b}"
        export, curve = self._train_in_parts(f"base{b}", out, settings, self.cfg.base_segments, paths.val,
                                             metric=self.primary())
        rec = RunRecord(f"base{b}", b, 0, 0.0, export, str(out / "sft"))
        for split, bench in (("val", paths.val), ("test", paths.test)):
            for metric in ("greedy", "sampled"):
                rec.scores[score_key(split, metric)] = self.score(rec, split, bench, metric)
        self.info.setdefault("base_curves", {})[b] = curve
        log0(f"base {b}: validation {self.cfg.rules.metric} accuracy by epoch " + curve_words(curve))
        return rec

    def student_samples(self, bases: list[RunRecord], paths: Paths) -> dict[int, Path]:
        """Each base's samples on the teacher pairs' problems -> out/student/base{b}/ (traces.student_data)."""
        from redi_ds.ablation import traces

        if not any(b.data in ("student", "rft") for b in self.cfg.branches.values()):
            return {}
        pairs = _read_jsonl(paths.teacher)
        dirs = {}
        for base in bases:
            d = self.out / "student" / f"base{base.base}"
            if not (d / "stats.json").exists():
                samples = self.sample(base.export, [{"problem": p["prompt"], "answer": p["answer"]} for p in pairs],
                                      self.cfg.student_samples)
                if self.rank == 0:
                    traces.student_data(pairs, samples, d)
                _barrier()
            self.info.setdefault("student", {})[base.base] = json.loads((d / "stats.json").read_text())
            dirs[base.base] = d
        return dirs

    def _data(self, kind: str, base: int, student: dict, paths: Paths) -> str:
        return {"stage2": lambda: paths.stage2, "teacher": lambda: paths.teacher,
                "student": lambda: str(student[base] / "student_pairs.jsonl"),
                "rft": lambda: str(student[base] / "rft.jsonl")}[kind]()

    def _branch_run(self, name: str, lr: float, variant: int, base: RunRecord, seed: int, student: dict,
                    paths: Paths) -> RunRecord:
        b = self.cfg.branch(name)
        tag = f"lr{lr:g}" + (f"-v{variant}" if b.grid else "")
        out = self.out / "runs" / name / f"base{base.base}" / tag / f"seed{seed}"
        settings = {"model.name_or_path": base.export, "data.path": self._data(b.data, base.base, student, paths),
                    "run.seed": seed, "train.lr": lr, "eval.heldout_pairs": paths.probe,
                    "eval.heldout_every": self.cfg.probe.every, **self.cfg.stage2, **b.overrides,
                    **(b.grid[variant] if b.grid else {})}
        if not paths.probe:
            settings["eval.heldout_every"] = 0
        result = self._train(b.stage, out, settings, {"branch": name, "seed": str(seed), "lr": f"{lr:g}",
                                                      "base": str(base.base)})
        return RunRecord(name, base.base, seed, lr, result.export, result.stage_dir, variant)

    # ------------------------------------------------------------------------- hyperparameters
    def choose(self, base: RunRecord, student: dict, paths: Paths) -> dict[str, Choice]:
        """Each branch's (LR, variant) with the best validation accuracy (primary metric; ``sweep_seed``)."""
        choices: dict[str, Choice] = {}
        for name, b in self.cfg.branches.items():
            if b.lr_from or (len(b.lrs) == 1 and len(b.grid) <= 1):
                continue
            choices[name] = self._sweep(name, base, student, paths)
            log0(f"sweep {name}: {choices[name].table} -> LR {choices[name].lr:g}, variant {choices[name].variant}"
                 + ("" if choices[name].bracketed else " (optimum at the grid's edge)"))
        for name, b in self.cfg.branches.items():
            if b.lr_from:
                src = choices.get(b.lr_from) or Choice(self.cfg.branch(b.lr_from).lrs[0], 0, False, {})
                choices[name] = replace(src, table={})
            elif name not in choices:
                choices[name] = Choice(b.lrs[0], 0, False, {})
        return choices

    def _sweep(self, name: str, base: RunRecord, student: dict, paths: Paths) -> Choice:
        b = self.cfg.branch(name)
        lrs, table = sorted(b.lrs), {}

        def val(lr: float, v: int) -> float:
            key = f"{lr:g}|{v}"
            if key not in table:
                rec = self._branch_run(name, lr, v, base, self.cfg.sweep_seed, student, paths)
                table[key] = self.score(rec, "val", paths.val, self.primary()).accuracy
            return table[key]

        extensions = self.cfg.rules.extend_grid
        while True:
            scored = [(val(lr, v), -i, lr, v) for i, lr in enumerate(lrs) for v in range(max(len(b.grid), 1))]
            _, _, lr, v = max(scored)
            edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1])
            if not edge or extensions == 0:
                return Choice(lr, v, not edge, table)
            extensions -= 1
            step = lrs[1] / lrs[0] if lr == lrs[0] else lrs[-1] / lrs[-2]
            lrs = [lrs[0] / step] + lrs if lr == lrs[0] else lrs + [lrs[-1] * step]

    def train_branches(self, bases: list[RunRecord], student: dict, paths: Paths, choices: dict
                       ) -> dict[str, list[RunRecord]]:
        runs: dict[str, list[RunRecord]] = {}
        for name in self.cfg.branches:
            c = choices[name]
            runs[name] = []
            for base in bases:
                for seed in range(self.cfg.seeds):
                    rec = self._branch_run(name, c.lr, c.variant, base, seed, student, paths)
                    for metric in ("greedy", "sampled"):
                        rec.scores[score_key("test", metric)] = self.score(rec, "test", paths.test, metric)
                    runs[name].append(rec)
                    log0(f"{name} base {base.base} seed {seed}: test greedy "
                         f"{100 * rec.scores['test'].accuracy:.1f}, sampled "
                         f"{100 * rec.scores['test-sampled'].accuracy:.1f}")
        return runs

    # ------------------------------------------------------------------------- scores
    def primary(self) -> str:
        return self.cfg.rules.metric

    def eval_options(self, metric: str = "greedy"):
        opts = self.cfg.eval if metric == "greedy" else self.cfg.sampled
        return replace(opts, system_prompt=self._system_prompt)

    @functools.cached_property
    def _system_prompt(self) -> Optional[str]:
        from redi_ds.config import load_config

        return load_config(self.cfg.recipe, stage="sft").data.system_prompt

    def score(self, rec: RunRecord, split: str, bench: str, metric: str = "greedy", where: str = "",
              root: Optional[Path] = None) -> Score:
        """Accuracy of an export on one split (greedy, or sampled pass@1), per problem (cached on disk)."""
        from redi_ds.eval import run_eval

        out = Path(root or rec.stage_dir) / (where or f"scores/{score_key(split, metric)}")
        if not (out / "summary.json").exists():
            run_eval(rec.export, bench, self.eval_options(metric), out_dir=str(out), rank=self.rank,
                     world_size=self.world, mlflow_run_id=_run_id(rec.stage_dir), tracking_uri=self.uri,
                     progress=False, print_table=False)
        _barrier()
        hits: dict[str, list[float]] = {}
        for row in _read_jsonl(out / "samples.jsonl"):  # k samples a problem: its fraction correct (pass@1)
            hits.setdefault(row["problem_id"], []).append(float(row["correct"]))
        correct = {pid: sum(v) / len(v) for pid, v in hits.items()}
        return Score(sum(correct.values()) / len(correct), correct, str(out))

    def reproduce(self, bench: str, metric: str = "greedy") -> str:
        """The command that re-scores ``{export}`` to the table's number."""
        from redi_ds.eval.__main__ import command_line

        return command_line("{export}", bench, self.eval_options(metric))

    # ------------------------------------------------------------------------- MLflow
    def _start_parent(self):
        from redi_ds.config import TrackingConfig
        from redi_ds.tracking import Tracker, git_commit

        tracker = Tracker(TrackingConfig(uri=self.uri, experiment=f"{self.name}-{self.size}"), str(self.out),
                          enabled=self.rank == 0)
        id_file = self.out / "mlflow_parent_run_id"
        prior = id_file.read_text().strip() if id_file.exists() else None
        params = {"config": self.name, "size": self.size, "bases": self.cfg.bases, "seeds": self.cfg.seeds,
                  "recipe": self.cfg.recipe, "branches": ",".join(self.cfg.branches), "metric": self.primary()}
        run_id = tracker.start(params, run_id=prior, run_name=f"{self.name}/{self.size}",
                               tags={"kind": "ablation", "git_commit": git_commit(), "command": self.command})
        if run_id and self.rank == 0:
            id_file.write_text(run_id)
        self.parent_run = _broadcast_obj(run_id or "")
        return tracker


def score_key(split: str, metric: str) -> str:
    """A RunRecord's scores key: ``test`` (greedy), ``test-sampled`` ..."""
    return split if metric == "greedy" else f"{split}-{metric}"


def curve_words(curve: list) -> str:
    """A validation curve, ``[(epochs, accuracy), ...]``, as ``8: 47.7, 16: 88.8``."""
    return ", ".join(f"{e:g}: {100 * a:.1f}" for e, a in curve)


def teacher_words(curve: list, target: float) -> str:
    """The teacher's validation curve and which part its strength rule took."""
    words = "validation sampled pass@1 by epoch " + curve_words(curve)
    if not target:
        return words
    if curve[-1][1] >= target:
        return words + f" (the first part at or above {100 * target:g}% is the teacher)"
    return words + f" (target {100 * target:g}% not reached: the last part is the teacher)"


def _run_id(stage_dir: str) -> Optional[str]:
    path = Path(stage_dir) / "mlflow_run_id"
    return path.read_text().strip() if path.exists() else None


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _broadcast_obj(value):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
