"""MLflow tracking on global rank 0 that never stops training.

Every call is queued and sent by one background thread, so a slow or dead tracking server costs the
training loop nothing: the first failure warns once, and the tracker then drops what is left. The
default store is ``sqlite:///{output_dir}/mlflow.db``; ``tracking.uri`` or ``MLFLOW_TRACKING_URI``
(a real ``mlflow server`` included) take precedence. ``mlflow`` is imported in the worker thread only.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Optional

_STOP = object()


def resolve_uri(uri: Optional[str], output_dir: str) -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve()}/mlflow.db"


class Tracker:
    """``Tracker(cfg.tracking, output_dir, enabled=rank == 0)``; then ``start``, ``log_*``, ``finish``."""

    def __init__(self, tracking_cfg, output_dir: str, enabled: bool = True):
        self.enabled = enabled and tracking_cfg.enabled
        self.uri = resolve_uri(tracking_cfg.uri, output_dir)
        self.experiment = tracking_cfg.experiment
        self.run_name = tracking_cfg.run_name
        self.run_id: Optional[str] = None
        self.failed = False
        self._q: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- public API: each only enqueues
    def start(self, params: dict[str, Any], run_id: Optional[str] = None, timeout: float = 30.0, *,
              run_name: Optional[str] = None, tags: Optional[dict[str, str]] = None,
              parent_run_id: Optional[str] = None) -> Optional[str]:
        """Start (or, with ``run_id``, reopen) the run; ``run_name`` and ``tags`` name it for browsing, and
        ``parent_run_id`` nests it under another run (``mlflow.parentRunId``)."""
        if not self.enabled:
            return None
        # fail fast instead of mlflow's minutes of HTTP retries when a server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if run_name:
            self.run_name = run_name
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self._thread = threading.Thread(target=self._worker, args=(params, run_id, tags), daemon=True, name="mlflow")
        self._thread.start()
        self._started.wait(timeout)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(("metrics", metrics, step))

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._put(("artifact", path, artifact_path))

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> None:
        if self._thread is None:
            return
        self._q.put(("end", status))
        self._q.put(_STOP)
        self._thread.join(timeout)

    # -- worker
    def _put(self, item) -> None:
        if self._thread is not None and not self.failed:
            self._q.put(item)

    def _warn(self, what: str, e: BaseException) -> None:
        if not self.failed:
            self.failed = True
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"[redi-ds] warning: MLflow {what} failed at {self.uri} ({type(e).__name__}: {first}); "
                  "tracking is off for the rest of this run, training goes on", file=sys.stderr, flush=True)

    def _worker(self, params: dict, run_id: Optional[str], tags: dict) -> None:
        try:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            if run_id is None:
                mlflow.set_experiment(self.experiment)
                run = mlflow.start_run(run_name=self.run_name, tags=tags or None)
            else:
                run = mlflow.start_run(run_id=run_id)
            self.run_id = run.info.run_id
            items = [(k, "" if v is None else str(v)[:500]) for k, v in params.items()]
            if run_id is not None:  # a reopened run (a stage trained on with more steps): params are immutable
                logged = run.data.params
                mlflow.set_tags({f"resumed_with.{k}": v for k, v in items if k in logged and logged[k] != v})
                items = [(k, v) for k, v in items if k not in logged]
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
        except Exception as e:  # noqa: BLE001
            self._warn("start", e)
        finally:
            self._started.set()
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if self.failed:
                continue
            try:
                kind = item[0]
                if kind == "metrics":
                    mlflow.log_metrics({k: float(v) for k, v in item[1].items()}, step=item[2])
                elif kind == "artifact":
                    mlflow.log_artifact(item[1], artifact_path=item[2])
                elif kind == "end":
                    mlflow.end_run(status=item[1])
            except Exception as e:  # noqa: BLE001
                self._warn("logging", e)


def run_tags(cfg, base_model: str) -> dict[str, str]:
    """Tags a person can browse training runs by: stage, loss and its options (each loss's config section gives
    them: alpha for REDI, beta and gamma for DPO / SimPO), the model it started from (and, for ``@stage``, that stage's MLflow run), the run
    name and the git commit of the code."""
    from redi_ds.stage import StageDir

    from redi_ds.losses import loss_tags

    tags = {"stage": cfg.stage, "base_model": base_model, "run": cfg.run.name, "git_commit": git_commit()}
    if cfg.model.name_or_path.startswith("@"):
        source = cfg.model.name_or_path[1:]
        tags["started_from_stage"] = source
        tags["started_from_run"] = StageDir(Path(cfg.run.output_dir) / source).run_id() or "unknown"
    return tags | loss_tags(cfg.loss)  # the loss's name and its own options (alpha; beta, gamma)


def git_commit() -> str:
    """The short commit of the checkout this code runs from ("unknown" for an installed copy)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
