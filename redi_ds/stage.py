"""The files of one stage directory, ``{run.output_dir}/{stage}/``, written by global rank 0.

    config.yaml         the resolved config of the latest run (also in every checkpoint)
    metrics.jsonl       one row per optimizer step; a resume drops the rows past its checkpoint
    heldout.jsonl       held-out pairs' length-normalised log-probs every eval.heldout_every steps (step 0 too)
    mlflow_run_id       the MLflow run a resume continues
    final_metrics.json  the result of the finished stage
    done                {"steps", "checkpoint"}: finished, with that final checkpoint
    preempted           stopped early (a checkpoint was saved); the same command resumes
    checkpoints/ export/ eval/   see redi_ds.checkpoints, redi_ds.model.export_hf, redi_ds.eval
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from redi_ds.config import Config, save_config
from redi_ds.errors import ConfigError, TrainingError
from redi_ds.ranks import log0


class StageDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.heldout = self.path / "heldout.jsonl"

    def begin(self, cfg: Config, start_step: int) -> Optional[str]:
        """A run starts at ``start_step``: save its config, clear the end markers, drop metric rows past the
        checkpoint; returns the MLflow run id to continue (a resumed run), else None."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.yaml")
        for marker in ("preempted", "done"):
            (self.path / marker).unlink(missing_ok=True)
        self.truncate_metrics(start_step)
        return self.run_id() if start_step > 0 else None

    def set_run_id(self, run_id: str) -> None:
        (self.path / "mlflow_run_id").write_text(run_id)

    def run_id(self) -> Optional[str]:
        path = self.path / "mlflow_run_id"
        return path.read_text().strip() if path.exists() else None

    def append_metrics(self, row: dict, path: Optional[Path] = None) -> None:
        with open(path or self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, steps: int) -> None:
        """Drop the rows past ``steps`` of metrics.jsonl and heldout.jsonl (a resume redoes them), and a last
        line torn by a kill mid-write."""
        for path in (self.metrics, self.heldout):
            rows = read_rows(path, repair=True)
            kept = [row for row in rows if row["step"] <= steps]
            if len(kept) != len(rows):
                path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def heldout_rows(self) -> list[dict]:
        """heldout.jsonl's rows (step, logp_chosen, logp_rejected, ...), oldest first; [] without a probe."""
        return read_rows(self.heldout)

    def last_metrics(self) -> dict:
        rows = read_rows(self.metrics)
        return rows[-1] if rows else {}

    def is_done(self) -> bool:
        return (self.path / "done").is_file()

    def write_result(self, result: dict) -> Path:
        path = self.path / "final_metrics.json"
        path.write_text(json.dumps(result, indent=2))
        return path

    def mark_done(self, steps: int, checkpoint: str) -> None:
        (self.path / "done").write_text(json.dumps({"steps": steps, "checkpoint": checkpoint}) + "\n")

    def mark_preempted(self, step: int) -> None:
        (self.path / "preempted").write_text(f"stopped after step {step}\n")

    def finished(self, cfg: Config, latest_checkpoint: Optional[Path]) -> Optional[dict]:
        """The stored result when this stage is done and its final checkpoint is the latest one; None when it is
        not done. A finished stage is never trained or rewritten again by a config that differs in what it trains:
        that is a one-line ConfigError naming the keys (``run.resume: never`` retrains it)."""
        import yaml

        try:
            done = json.loads((self.path / "done").read_text())
            saved = yaml.safe_load((self.path / "config.yaml").read_text())
            result = json.loads((self.path / "final_metrics.json").read_text())
        except (OSError, ValueError, TypeError, yaml.YAMLError):
            return None
        if latest_checkpoint is None or latest_checkpoint.name != done.get("checkpoint"):
            return None
        now = json.loads(json.dumps(cfg.to_dict()))
        differ = config_differences(saved, now)
        if differ:
            shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in differ[:4]) + (" ..." if len(differ) > 4 else "")
            raise ConfigError(f"{self.path} is a finished stage trained with another config: {shown}; it is not "
                              "retrained or rewritten. To train it again with this config pass --run.resume never "
                              "(its checkpoints are moved aside), or choose another run.output_dir")
        if any(_get(saved, k) != _get(now, k) for k in LONGER):
            return None  # more steps: the run resumes from the final checkpoint and trains on
        return result


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# keys that do not change what a stage trains: where it logs, how it is evaluated, how often it saves
UNTRAINED = ("run.resume", "tracking.", "eval.", "kernel.", "train.save_every", "train.keep_checkpoints",
             "train.log_every", "train.stop_after_steps", "train.max_nonfinite_steps")
LONGER = ("train.max_steps", "train.epochs")  # a finished stage asked for more steps trains on from its end


def config_differences(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) for every training-relevant key that differs."""
    def flat(tree, prefix=""):
        out = {}
        for k, v in (tree or {}).items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
        return out

    a, b = flat(saved), flat(now)
    keys = sorted(set(a) | set(b))
    skip = UNTRAINED + LONGER
    return [(k, a.get(k), b.get(k)) for k in keys
            if a.get(k) != b.get(k) and not any(k == u or (u.endswith(".") and k.startswith(u)) for u in skip)]


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The JSON rows of a metrics file; a last line torn by a kill mid-write is dropped (with a notice, and from the
    file itself when ``repair``). A bad line elsewhere is a TrainingError naming the file and line."""
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines):
                raise TrainingError(f"{path}:{i}: not a JSON row (the file was edited or damaged); remove the "
                                    "line or the file to go on") from None
            log0(f"{path}: dropping its last line, torn by a run killed while writing it")
            if repair:
                path.write_text("".join(ln + "\n" for ln in lines[:-1]))
    return rows
