"""MLflow tracking: a real `mlflow server` on loopback, and a server that dies mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trainutil import FAST, TRAIN, env_for, free_port, losses

ROOT = Path(__file__).resolve().parent.parent


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--artifacts-destination", str(tmp / "artifacts")],
        cwd=tmp, env=env_for(tmp), stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp / "server.log").read_text()[-2000:]
    proc.kill()
    raise AssertionError("mlflow server did not come up: " + (tmp / "server.log").read_text()[-2000:])


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def train_cmd(out: Path, uri: str, steps: int) -> list[str]:
    return [sys.executable, TRAIN, "--stage", "redi", *FAST, "--model.name_or_path", "tiny",
            "--model.sft_if_missing", "false", "--train.max_steps", str(steps), "--train.export", "false",
            "--tracking.enabled", "true", "--tracking.uri", uri, "--run.output_dir", str(out)]


def test_tracker_with_unreachable_server_warns_once_and_goes_on(tmp_path, capsys):
    from redi_ds.config import TrackingConfig
    from redi_ds.tracking import Tracker

    t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port()}"), str(tmp_path))
    t0 = time.time()
    assert t.start({"a": 1}) is None
    for i in range(5):
        t.log_metrics({"loss": 1.0}, step=i)
    t.finish()
    assert time.time() - t0 < 60
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1 and "training goes on" in err


def test_a_reopened_run_keeps_its_params_and_tags_what_changed(tmp_path, capsys):
    """A finished stage trained on with more epochs reopens its MLflow run: MLflow's params are immutable, so the
    changed value becomes a tag and tracking stays on."""
    from mlflow.tracking import MlflowClient

    from redi_ds.config import TrackingConfig
    from redi_ds.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/m.db"
    t = Tracker(TrackingConfig(uri=uri, experiment="e"), str(tmp_path))
    run_id = t.start({"train.epochs": 1, "lr": 0.1})
    t.log_metrics({"loss": 2.0}, step=1)
    t.finish()
    t = Tracker(TrackingConfig(uri=uri, experiment="e"), str(tmp_path))
    assert t.start({"train.epochs": 2, "lr": 0.1, "new": "x"}, run_id=run_id) == run_id
    t.log_metrics({"loss": 1.0}, step=2)
    t.finish()
    assert "warning" not in capsys.readouterr().err and not t.failed
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"train.epochs": "1", "lr": "0.1", "new": "x"}
    assert run.data.tags["resumed_with.train.epochs"] == "2" and "resumed_with.lr" not in run.data.tags
    assert [m.value for m in MlflowClient(uri).get_metric_history(run_id, "loss")] == [2.0, 1.0]


def test_tracker_default_store_is_sqlite_in_output_dir(tmp_path):
    from redi_ds.config import TrackingConfig
    from redi_ds.tracking import resolve_uri

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert resolve_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = "http://example.invalid:5000"
        assert resolve_uri(None, str(tmp_path)) == "http://example.invalid:5000"
        assert resolve_uri("sqlite:///x.db", str(tmp_path)) == "sqlite:///x.db"
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert TrackingConfig().enabled


@pytest.mark.slow
def test_training_logs_to_a_real_mlflow_server(tmp_path):
    from mlflow.tracking import MlflowClient

    proc, url = start_server(tmp_path)
    try:
        # with an evaluation of the export at the end, logged under the same run
        cmd = train_cmd(tmp_path / "run", url, 3) + [
            "--train.export", "true", "--eval.benchmarks", "math500", "--eval.limit", "2",
            "--eval.max_new_tokens", "8", "--eval.backend", "hf"]
        r = subprocess.run(cmd, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        run_id = (tmp_path / "run" / "redi" / "mlflow_run_id").read_text().strip()
        assert f"MLflow run {run_id} at {url}" in r.stdout
        client = MlflowClient(tracking_uri=url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "tiny/redi"
        tags = run.data.tags
        assert (tags["stage"], tags["loss"], tags["alpha"], tags["base_model"], tags["run"]) == (
            "redi", "redi", "0.8", "tiny", "tiny") and tags["git_commit"]
        assert run.data.params["loss.alpha"] == "0.8" and run.data.params["loss.name"] == "redi"
        assert run.data.params["train.global_batch_size"] == "8" and run.data.params["world_size"] == "1"
        for key in ("loss", "logp_chosen", "logp_rejected", "margin", "lr", "grad_norm", "tokens_per_s"):
            assert len(client.get_metric_history(run_id, key)) == 3, key
        logged = [m.value for m in client.get_metric_history(run_id, "loss")]
        assert logged == pytest.approx(losses(tmp_path / "run" / "redi"), rel=1e-6)
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "final_metrics.json", "metrics.jsonl", "eval"} <= artifacts
        assert "eval/math500/pass_at_1" in run.data.metrics
        assert len((tmp_path / "run" / "redi" / "eval" / "samples.jsonl").read_text().splitlines()) == 2
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_training_finishes_when_the_server_dies(tmp_path):
    proc, url = start_server(tmp_path)
    out = tmp_path / "run"
    train = subprocess.Popen(train_cmd(out, url, 6), cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    metrics = out / "redi" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and train.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    stop_server(proc)  # the server goes away mid-run
    stdout, stderr = train.communicate(timeout=900)
    assert train.returncode == 0, stderr[-4000:]
    assert len(losses(out / "redi")) == 6
    assert stderr.count("warning: MLflow") == 1
    assert json.loads((out / "redi" / "final_metrics.json").read_text())["steps"] == 6
