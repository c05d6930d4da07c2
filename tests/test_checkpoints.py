"""Checkpoints that cannot be lost, and runs that go wrong stopping clearly (slow: real training processes).

Each test reproduces a failure found by trying the trainer as a user and an operator would: rotation deleting
the checkpoint just written, a stop request on a save step saving twice, a SIGKILL during a save, a full
disk, a diverged run exporting a NaN model, two runs on one stage directory, a rerun of a finished stage,
and a checkpoint resumed with another world size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainutil import FAST, TRAIN, env_for, free_port, losses, python_train, torchrun

pytestmark = pytest.mark.slow

SFT = ["--stage", "sft", *FAST, "--train.export", "false"]


def _ckpts(stage: Path) -> list[str]:
    root = stage / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _latest(stage: Path) -> str:
    return (stage / "checkpoints" / "latest").read_text().strip()


def _error_line(r) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def test_rotation_keeps_this_runs_checkpoints_and_reruns_say_done(tmp_path):
    stage = tmp_path / "sft"
    run = [*SFT, "--train.save_every", "2", "--run.output_dir", str(tmp_path)]
    torchrun([*run, "--train.max_steps", "6"], tmp_path, nproc=1)
    assert _ckpts(stage) == ["step_4", "step_6"]
    # a shorter run from scratch in the same folder: its own checkpoint survives the older, higher ones
    r = torchrun([*run, "--train.max_steps", "2", "--run.resume", "never"], tmp_path, nproc=1)
    assert "moved the stage's earlier checkpoints" in r.stdout
    assert _ckpts(stage) == ["step_2"] and _latest(stage) == "step_2"
    stale = list(stage.glob("checkpoints.stale-*"))
    assert len(stale) == 1 and sorted(p.name for p in stale[0].iterdir() if p.is_dir()) == ["step_4", "step_6"]
    assert len(losses(stage)) == 2
    # the plain command again: the stage is done with this config, and nothing is rebuilt or overwritten
    final = (stage / "final_metrics.json").read_text()
    r = torchrun([*run, "--train.max_steps", "2"], tmp_path, nproc=1)
    assert "stage sft is already done (2 steps" in r.stdout and "resumed" not in r.stdout
    assert (stage / "final_metrics.json").read_text() == final and json.loads(final)["final"]["step"] == 2
    # a longer run resumes from the finished one instead of redoing it
    r = torchrun([*run, "--train.max_steps", "4"], tmp_path, nproc=1)
    assert "at step 2" in r.stdout and _ckpts(stage) == ["step_2", "step_4"] and len(losses(stage)) == 4


def test_stop_request_on_a_save_step_saves_once(tmp_path):
    stage = tmp_path / "sft"
    r = torchrun([*SFT, "--train.max_steps", "6", "--train.save_every", "2", "--train.stop_after_steps", "2",
                  "--run.output_dir", str(tmp_path)], tmp_path, nproc=1)
    assert r.stdout.count(f"{(stage / 'checkpoints' / 'step_2').resolve()} (") == 1, r.stdout
    assert (stage / "preempted").exists() and _latest(stage) == "step_2"


def test_sigkill_during_a_save_leaves_the_last_complete_checkpoint(sft_run, tmp_path):
    stage = tmp_path / "sft"
    run = [*SFT, "--train.max_steps", "6", "--train.save_every", "2", "--run.output_dir", str(tmp_path)]
    env = env_for(tmp_path) | {"REDI_DS_FAULT": "kill_during_save:4"}
    r = torchrun(run, tmp_path, env=env, check=False)
    assert r.returncode != 0
    assert _latest(stage) == "step_2" and "step_4.partial" in _ckpts(stage) and "step_4" not in _ckpts(stage)
    r = torchrun(run, tmp_path)
    assert "step_4.partial: an unfinished checkpoint" in r.stdout and "at step 2" in r.stdout, r.stdout[-2000:]
    assert "step_4.partial" not in _ckpts(stage) and _latest(stage) == "step_6"
    base, _ = sft_run  # the same training, never interrupted
    assert losses(stage) == pytest.approx(losses(base / "sft"), rel=1e-6, abs=1e-7)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for one checkpoint of the tiny arith model (1.3 MiB), not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(small_disk, tmp_path):
    stage = small_disk / "sft"
    r = python_train([*SFT, "--train.max_steps", "6", "--train.save_every", "2", "--run.output_dir",
                      str(small_disk)], tmp_path, check=False)
    assert r.returncode == 1
    line = _error_line(r)
    assert line.startswith("error: disk full: checkpoint step_4 needs about") and "step_2" in line, line
    assert _latest(stage) == "step_2" and (stage / "checkpoints" / "step_2" / "meta.json").is_file()
    assert not (stage / "done").exists()


def test_a_diverged_run_stops_without_export(tmp_path):
    stage = tmp_path / "sft"
    r = python_train([*SFT, "--train.max_steps", "8", "--train.save_every", "1", "--train.lr", "1e30",
                      "--train.export", "true", "--run.output_dir", str(tmp_path)], tmp_path, check=False)
    assert r.returncode == 1
    line = _error_line(r)
    assert line.startswith("error: training diverged: loss ") and "no export was written" in line, line
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) < 8 and not all(map(lambda x: x == x, [row["loss"] for row in rows]))
    assert not (stage / "export").exists() and not (stage / "done").exists()
    good = _latest(stage)  # the last checkpoint holds finite weights and the error names it
    assert good in line and int(good.split("_")[1]) < rows[-1]["step"]


def test_two_runs_on_one_stage_dir(tmp_path):
    stop = tmp_path / "stop"
    env = env_for(tmp_path) | {"REDI_DS_STOP_FILE": str(stop)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           TRAIN, *SFT, "--train.epochs", "1000", "--train.max_steps", "5000", "--run.output_dir", str(tmp_path)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "sft" / "metrics.jsonl").exists():  # the first run holds the lock and trains
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.5)
        second = python_train([*SFT, "--train.max_steps", "200", "--run.output_dir", str(tmp_path)], tmp_path,
                              check=False)
        assert first.poll() is None, "the first run must still be training"
    finally:
        stop.touch()
        out, err = first.communicate(timeout=300)
    assert second.returncode == 2
    assert "is in use by another run (pid" in _error_line(second)
    assert first.returncode == 0 and "stopped early" in out
    steps = [json.loads(x)["step"] for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer


def test_resume_with_another_world_size_is_one_line(sft_run, tmp_path):
    base, _ = sft_run  # written by 2 ranks
    r = python_train([*SFT, "--train.max_steps", "8", "--run.resume", str(base / "sft" / "checkpoints" / "step_6"),
                      "--run.output_dir", str(tmp_path)], tmp_path, check=False)
    assert r.returncode == 2
    line = _error_line(r)
    assert "was written by 2 ranks and this run has 1" in line and "resume with 2 ranks" in line, line


def test_bad_zero_key_is_one_line_before_the_data_load(tmp_path):
    r = subprocess.run([sys.executable, TRAIN, "--stage", "sft", "--deepspeed.zero",
                        "{stage3_param_persistance_threshold: 0}", "--data.path", str(tmp_path / "missing.jsonl"),
                        "--run.output_dir", str(tmp_path)], env=env_for(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    line = _error_line(r)
    assert "zero_optimization.stage3_param_persistance_threshold: Extra inputs are not permitted" in line, line
