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
        """Drop the rows past ``steps`` of metrics.jsonl and heldout.jsonl (a resume redoes them)."""
        for path in (self.metrics, self.heldout):
            if not path.exists():
                continue
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line)["step"] <= steps]
            if len(kept) != len(rows):
                path.write_text("".join(line + "\n" for line in kept))

    def heldout_rows(self) -> list[dict]:
        """heldout.jsonl's rows (step, logp_chosen, logp_rejected, ...), oldest first; [] without a probe."""
        if not self.heldout.exists():
            return []
        return [json.loads(line) for line in self.heldout.read_text().splitlines() if line.strip()]

    def last_metrics(self) -> dict:
        rows = [line for line in self.metrics.read_text().splitlines() if line.strip()] if self.metrics.exists() else []
        return json.loads(rows[-1]) if rows else {}

    def write_result(self, result: dict) -> Path:
        path = self.path / "final_metrics.json"
        path.write_text(json.dumps(result, indent=2))
        return path

    def mark_done(self, steps: int, checkpoint: str) -> None:
        (self.path / "done").write_text(json.dumps({"steps": steps, "checkpoint": checkpoint}) + "\n")

    def mark_preempted(self, step: int) -> None:
        (self.path / "preempted").write_text(f"stopped after step {step}\n")

    def finished(self, cfg: Config, latest_checkpoint: Optional[Path]) -> Optional[dict]:
        """The stored result when this stage is done with this very config and its final checkpoint is the
        latest one; None otherwise (``run.resume`` does not count: how a stage was reached is not what it
        trained)."""
        import yaml

        try:
            done = json.loads((self.path / "done").read_text())
            saved = yaml.safe_load((self.path / "config.yaml").read_text())
            result = json.loads((self.path / "final_metrics.json").read_text())
        except (OSError, ValueError, TypeError, yaml.YAMLError):
            return None
        now = json.loads(json.dumps(cfg.to_dict()))
        if _without_resume(saved) != _without_resume(now):
            return None
        if latest_checkpoint is None or latest_checkpoint.name != done.get("checkpoint"):
            return None
        return result


def _without_resume(tree: dict) -> dict:
    return {**tree, "run": {k: v for k, v in (tree.get("run") or {}).items() if k != "resume"}}
