"""The `redi-ds` command under the launchers users run it with, and the GPU check's CPU dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainutil import FAST, ROOT, env_for, free_port, losses

pytestmark = pytest.mark.slow

ONE_STEP = ["--stage", "sft", *FAST, "--train.max_steps", "2", "--train.export", "false"]


def test_torchrun_module_and_deepspeed_module_train_like_the_script(tmp_path):
    """`torchrun -m redi_ds train` and `deepspeed --module redi_ds train` (which puts --local_rank=N before the
    subcommand) train the same two steps as `launch/train.py`."""
    env = env_for(tmp_path)
    runs = {
        "script": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(ROOT / "launch" / "train.py")],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port()), "-m", "redi_ds", "train"],
        "deepspeed": [str(ROOT / ".venv" / "bin" / "deepspeed") if (ROOT / ".venv" / "bin" / "deepspeed").exists()
                      else "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "redi_ds",
                      "train"],
    }
    got = {}
    for name, cmd in runs.items():
        out = tmp_path / name
        r = subprocess.run([*cmd, *ONE_STEP, "--run.output_dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{name}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        got[name] = losses(out / "sft")
    assert len(got["script"]) == 2
    assert got["torchrun"] == pytest.approx(got["script"], rel=1e-6)
    assert got["deepspeed"] == pytest.approx(got["script"], rel=1e-6)


def test_gpu_check_dry_run(tmp_path):
    """kernels/gpu_check.py --dry-run: every section's plumbing on CPU at tiny shapes, its table and JSON."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "kernels" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["correctness"] and all(row["ok"] for row in rep["correctness"])
    assert {row["form"] for row in rep["correctness"]} == {"single_pass", "two_pass"}
    bench = {(row["method"], row["N"]): row for row in rep["bench"]}
    for method in ("triton", "triton_2pass", "triton_frozen_head", "torch_twin", "naive"):  # the same objective
        assert bench[(method, 512)]["loss_vs_naive"] < 1e-5
    assert "CUDA" in bench[("liger_flce", 512)]["skip"] and "CUDA" in bench[("cce", 512)]["skip"]
    train = {row["variant"]: row for row in rep["train"]}
    assert [s["loss"] for s in train["torch"]["steps"]] == pytest.approx(
        [s["loss"] for s in train["reference"]["steps"]], rel=1e-5)
    assert "CUDA" in train["triton+liger"]["skip"]
    assert r.stdout.strip().splitlines()[-1].startswith("| triton+liger |")  # the short table comes last
