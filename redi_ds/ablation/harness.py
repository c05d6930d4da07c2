"""The experiment: one SFT base, stage-2 branches from it over seeds, paired scores on held-out problems.

    data      the task's splits (generated) or the config's paths; held-out probe pairs
    base      stage 1: the recipe's sft stage (``base`` overrides), scored on val and test
    negatives the base's own incorrect samples on the stage-2 problems (redi_ds.data.negatives); every
              branch trains on exactly these problems: continued SFT on their teacher traces, or pairs
    sweep     each branch's LR chosen on the validation set with the first seed (``sweep: true``)
    branches  every branch x seed from the base, same steps and schedule; scored on the test set
    report    results.json, summary.md, plots (redi_ds.ablation.report)

Every run is the trainer's own ``train(cfg)`` in this process (one process group, no start-up per run); a
finished run or score is reused when ``--out`` already holds it, so an interrupted ablation resumes. Scores
come from ``run_eval`` with the options of the recorded ``python -m redi_ds.eval`` command, so that command
re-scores any export to the same number. MLflow: a parent run for the ablation, a child per training run.
"""

from __future__ import annotations

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
    correct: dict  # problem id -> 0/1
    out: str


@dataclass
class RunRecord:
    branch: str
    seed: int
    lr: float
    export: str
    stage_dir: str
    scores: dict = field(default_factory=dict)  # split -> Score


class Ablation:
    def __init__(self, cfg: AblationConfig, out: Path, name: str, size: str, command: str):
        self.cfg, self.out, self.name, self.size, self.command = cfg, Path(out).resolve(), name, size, command
        self.rank, self.world = ranks.rank(), ranks.world_size()
        self.uri = f"sqlite:///{self.out}/mlflow.db"
        self.parent_run: Optional[str] = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------- the whole experiment
    def run(self) -> dict:
        from redi_ds.ablation import report

        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # the markers launch/slurm/train.sbatch reads (as a stage's)
            for marker in ("preempted", "done"):
                (self.out / marker).unlink(missing_ok=True)
        paths = self._timed("data", self.prepare_data)
        tracker = self._start_parent()
        try:
            base = self._timed("base", self.train_base, paths)
            neg_dir = self._timed("negatives", self.student_negatives, base, paths)
            lrs, sweep, sweep_runs = self._timed("sweep", self.choose_lrs, base, neg_dir, paths)
            runs = self._timed("branches", self.train_branches, base, neg_dir, paths, lrs)
            results = report.results(self, base, runs, sweep, sweep_runs, lrs, paths)
            self.timings["total"] = time.time() - t0
            results["timings_s"] = self._cumulative_timings()
            if self.rank == 0:
                files = report.write(self.out, results)
                for f in files:
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
        """Seconds per phase summed over every invocation on this --out (a resumed run's parts add up)."""
        path = self.out / "timings.json"
        prior = json.loads(path.read_text()) if path.exists() else {}
        total = {k: round(prior.get(k, 0.0) + self.timings.get(k, 0.0), 1) for k in {*prior, *self.timings}}
        if self.rank == 0:
            path.write_text(json.dumps(total, indent=1) + "\n")
        return total

    def _timed(self, what: str, fn, *args):
        t = time.time()
        try:
            return fn(*args)
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.time() - t

    # ------------------------------------------------------------------------- data
    def prepare_data(self) -> Paths:
        from redi_ds.ablation import task

        cfg = self.cfg
        data_dir = self.out / "data"
        if cfg.task is None:
            d = cfg.data
            return Paths(sft=d.sft, stage2=d.stage2 or d.sft, teacher=d.teacher, val=d.val or d.test, test=d.test,
                         probe=d.probe)
        if self.rank == 0 and not (data_dir / "test.jsonl").exists():
            task.write(cfg.task, data_dir)
            _head_jsonl(data_dir / "teacher_pairs.jsonl", 0)  # (validates the file exists)
        _barrier()
        probe = data_dir / "probe_pairs.jsonl"
        if self.rank == 0 and not probe.exists():  # held-out pairs: validation problems, teacher mistakes
            rows = task.generate(cfg.task)["val"][: cfg.probe.pairs]
            with open(probe, "w") as f:
                for r in rows:
                    f.write(json.dumps({"prompt": r["problem"], "chosen": r["response"], "rejected": r["rejected"]})
                            + "\n")
        _barrier()
        return Paths(sft=str(data_dir / "sft.jsonl"), stage2=str(data_dir / "stage2.jsonl"),
                     teacher=str(data_dir / "teacher_pairs.jsonl"), val=str(data_dir / "val.jsonl"),
                     test=str(data_dir / "test.jsonl"), probe=str(probe))

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

    def train_base(self, paths: Paths) -> RunRecord:
        out = self.out / "base"
        probe = {"eval.heldout_pairs": paths.probe, "eval.heldout_every": self.cfg.probe.base_every} \
            if paths.probe and self.cfg.probe.base_every else {}
        result = self._train("sft", out, {"data.path": paths.sft, **probe, **self.cfg.base},
                             {"branch": "base", "seed": "-"})
        rec = RunRecord("base", 0, 0.0, result.export, result.stage_dir)
        for split in ("val", "test"):
            rec.scores[split] = self.score(rec, split, getattr(paths, split))
        log0(f"base: val {rec.scores['val'].accuracy:.3f}, test {rec.scores['test'].accuracy:.3f} ({rec.export})")
        return rec

    def student_negatives(self, base: RunRecord, paths: Paths) -> Optional[Path]:
        """out/negatives: pairs/ and sft/ of the stage-2 problems the base got wrong, teacher.jsonl likewise
        (None when no branch trains on the student's negatives)."""
        from redi_ds.data import negatives

        if not any(b.data == "student" for b in self.cfg.branches.values()):
            return None
        out = self.out / "negatives"
        if self.rank == 0 and not (out / "stats.json").exists():
            rows = negatives.load_problems(paths.stage2)
            opts = replace(self.cfg.negatives, system_prompt=self._system_prompt())
            pairs, positives, rep = negatives.sample_negatives(base.export, rows, opts)
            negatives.write(str(out), pairs, positives, rep, {"model": base.export, "data": paths.stage2,
                                                             **opts.__dict__})
            wrong = {p["prompt"] for p in pairs}
            with open(out / "teacher.jsonl", "w") as f:  # the teacher's mistakes on the same problems
                for row in _read_jsonl(paths.teacher):
                    if row["prompt"] in wrong:
                        f.write(json.dumps(row) + "\n")
            log0(f"negatives: {rep.line()}")
        _barrier()
        return out

    def _branch_settings(self, name: str, lr: float, seed: int, neg_dir: Optional[Path], paths: Paths,
                         base: RunRecord) -> dict:
        b = self.cfg.branch(name)
        if neg_dir is not None:  # every branch on the problems the student got wrong
            data = {"stage2": str(neg_dir), "student": str(neg_dir), "teacher": str(neg_dir / "teacher.jsonl")}
        else:  # no branch samples the student: the configured stage-2 data
            data = {"stage2": paths.stage2, "teacher": paths.teacher}
        data = data[b.data]
        return {"model.name_or_path": base.export, "data.path": data, "run.seed": seed, "train.lr": lr,
                "eval.heldout_pairs": paths.probe, "eval.heldout_every": self.cfg.probe.every,
                **self.cfg.stage2, **b.overrides}

    def _branch_run(self, name: str, lr: float, seed: int, neg_dir: Path, paths: Paths, base: RunRecord
                    ) -> RunRecord:
        b = self.cfg.branch(name)
        out = self.out / "runs" / name / f"lr{lr:g}" / f"seed{seed}"
        result = self._train(b.stage, out, self._branch_settings(name, lr, seed, neg_dir, paths, base),
                             {"branch": name, "seed": str(seed), "lr": f"{lr:g}"})
        return RunRecord(name, seed, lr, result.export, result.stage_dir)

    def choose_lrs(self, base: RunRecord, neg_dir: Path, paths: Paths) -> tuple[dict, dict, dict]:
        """{branch: lr}, {branch: {lr: validation accuracy}} and {branch: {lr: RunRecord}} (first seed; both
        empty without a sweep)."""
        lrs, sweep, sweep_runs = {}, {}, {}
        for name, b in self.cfg.branches.items():
            if not self.cfg.sweep or len(b.lrs) == 1:
                lrs[name] = b.lrs[0]
                continue
            sweep[name], sweep_runs[name] = {}, {}
            for lr in b.lrs:
                rec = self._branch_run(name, lr, 0, neg_dir, paths, base)
                sweep[name][f"{lr:g}"] = self.score(rec, "val", paths.val).accuracy
                sweep_runs[name][f"{lr:g}"] = rec
            lrs[name] = max(b.lrs, key=lambda lr: (sweep[name][f"{lr:g}"], -b.lrs.index(lr)))
            log0(f"sweep {name}: validation accuracy by LR {sweep[name]} -> {lrs[name]:g}")
        return lrs, sweep, sweep_runs

    def train_branches(self, base: RunRecord, neg_dir: Path, paths: Paths, lrs: dict) -> dict[str, list[RunRecord]]:
        runs: dict[str, list[RunRecord]] = {}
        for name in self.cfg.branches:
            runs[name] = []
            for seed in range(self.cfg.seeds):
                rec = self._branch_run(name, lrs[name], seed, neg_dir, paths, base)
                rec.scores["test"] = self.score(rec, "test", paths.test)
                runs[name].append(rec)
                log0(f"{name} seed {seed} (lr {lrs[name]:g}): test {rec.scores['test'].accuracy:.3f}")
        return runs

    # ------------------------------------------------------------------------- scores
    def eval_options(self):
        return replace(self.cfg.eval, system_prompt=self._system_prompt())

    def _system_prompt(self) -> Optional[str]:
        from redi_ds.config import load_config

        return load_config(self.cfg.recipe, stage="sft").data.system_prompt

    def score(self, rec: RunRecord, split: str, bench: str) -> Score:
        """Greedy accuracy of an export on one split, with per-problem correctness (cached in the stage dir)."""
        from redi_ds.eval import run_eval

        out = Path(rec.stage_dir) / "scores" / split
        summary_file = out / "summary.json"
        if not summary_file.exists():
            run_eval(rec.export, bench, self.eval_options(), out_dir=str(out), rank=self.rank,
                     world_size=self.world, mlflow_run_id=_run_id(rec.stage_dir), tracking_uri=self.uri,
                     progress=False, print_table=False)
        _barrier()
        hits: dict[str, list[float]] = {}
        for row in _read_jsonl(out / "samples.jsonl"):  # k samples a problem: its fraction correct (pass@1)
            hits.setdefault(row["problem_id"], []).append(float(row["correct"]))
        correct = {pid: sum(v) / len(v) for pid, v in hits.items()}
        return Score(sum(correct.values()) / len(correct), correct, str(out))

    def reproduce(self, bench: str) -> str:
        """The command that re-scores ``{export}`` to the table's number."""
        from redi_ds.eval.__main__ import command_line

        return command_line("{export}", bench, self.eval_options())

    # ------------------------------------------------------------------------- MLflow
    def _start_parent(self):
        from redi_ds.config import TrackingConfig
        from redi_ds.tracking import Tracker, git_commit

        tracker = Tracker(TrackingConfig(uri=self.uri, experiment=f"{self.name}-{self.size}"), str(self.out),
                          enabled=self.rank == 0)
        id_file = self.out / "mlflow_parent_run_id"
        prior = id_file.read_text().strip() if id_file.exists() else None
        params = {"config": self.name, "size": self.size, "seeds": self.cfg.seeds, "recipe": self.cfg.recipe,
                  "branches": ",".join(self.cfg.branches), "sweep": self.cfg.sweep}
        run_id = tracker.start(params, run_id=prior, run_name=f"{self.name}/{self.size}",
                               tags={"kind": "ablation", "git_commit": git_commit(), "command": self.command})
        if run_id and self.rank == 0:
            id_file.write_text(run_id)
        self.parent_run = _broadcast_str(run_id or "")
        return tracker


def _run_id(stage_dir: str) -> Optional[str]:
    path = Path(stage_dir) / "mlflow_run_id"
    return path.read_text().strip() if path.exists() else None


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _head_jsonl(path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
