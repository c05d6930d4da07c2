"""launch/slurm on a real Slurm 22.05 cluster: two namespaced nodes on this machine (tests/slurm_cluster.py).

Needs root, slurm-wlm and munge (``bash .ci/install_slurm.sh``); skipped otherwise, except under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainutil import ARITH

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SBATCH = str(ROOT / "launch" / "slurm" / "train.sbatch")
PIPELINE = str(ROOT / "launch" / "slurm" / "pipeline.sh")
TRAIN = str(ROOT / "launch" / "train.py")

# tiny config on the arith tokenizer, small batches, ZeRO-3 really partitioned; 30 optimizer steps (4 epochs of
# 8): long enough that a USR1 sent after the first step lands before the last one
STEPS = 30
FAST = ["--config", "tiny", "--data.synthetic_size", "32", "--train.epochs", "4", "--train.global_batch_size", "4",
        "--train.micro_batch_size", "2", "--data.max_length", "384",
        "--deepspeed.zero", "{stage3_param_persistence_threshold: 0}", "--tracking.enabled", "false",
        "--eval.benchmarks", "[]", "--eval.heldout_every", "0", *ARITH]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def job_env(slurm_cluster, tmp_path_factory):
    """Env for sbatch and the jobs: the venv's python, OMP_NUM_THREADS=1, TMPDIR and caches in the test's folders."""
    env = slurm_cluster.env
    tmp = tmp_path_factory.mktemp("slurm-tmp")
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               REDI_DS_PYTHON=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(tmp), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    for k in ("MLFLOW_TRACKING_URI", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "REDI_DS_STOP_FILE"):
        env.pop(k, None)
    return env


def losses(stage_dir: Path) -> list[float]:
    """Per-step losses from metrics.jsonl; a step logged twice (around a resume) counts once, the last."""
    by_step: dict[int, float] = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row["loss"]
    assert sorted(by_step) == list(range(1, len(by_step) + 1)), sorted(by_step)
    return [by_step[s] for s in sorted(by_step)]


def job_logs(stage_dir: Path, job_id: int | None = None, tail: int = 60) -> str:
    out = []
    for d in sorted(stage_dir.glob(f"slurm-{job_id or '*'}")):
        for f in sorted(d.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.relative_to(stage_dir)}\n" + "\n".join(lines))
    return "\n".join(out)


def sbatch_train(cluster, env, out: Path, *sbatch_args: str, stage: str = "sft", extra=()) -> int:
    out.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(*sbatch_args, f"--output={out}/batch-%j.out", SBATCH, "--stage", stage, *FAST,
                          "--run.output_dir", str(out), *extra, cwd=ROOT, env=env)


def assert_completed(cluster, job_id: int, out: Path, stage: str = "sft", timeout: float = 240) -> dict:
    info = cluster.wait(job_id, timeout)
    batch = out / f"batch-{job_id}.out"
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job_id}: {info.get('JobState')} {info.get('ExitCode')}\n"
        f"{batch.read_text() if batch.exists() else ''}\n{job_logs(out / stage, job_id)}")
    return info


def wait_for_steps(cluster, job_id: int, stage_dir: Path, steps: int, timeout: float = 180) -> None:
    metrics = stage_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        info = cluster.job(job_id)
        if info and info.get("JobState") in cluster_final():
            pytest.fail(f"job {job_id} ended ({info['JobState']}) before step {steps}\n{job_logs(stage_dir)}")
        time.sleep(0.2)
    pytest.fail(f"job {job_id}: no step {steps} after {timeout:.0f}s\n{job_logs(stage_dir)}")


def cluster_final() -> set[str]:
    from slurm_cluster import FINAL_STATES

    return FINAL_STATES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def host_run(job_env, tmp_path_factory):
    """The reference: the same stage on this machine, torchrun --nproc_per_node 2, no Slurm."""
    out = tmp_path_factory.mktemp("host")
    env = {k: v for k, v in job_env.items() if not k.startswith("SLURM")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), TRAIN, "--stage", "sft", *FAST, "--train.max_steps", str(STEPS),
           "--run.output_dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"host run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    ls = losses(out / "sft")
    assert len(ls) == STEPS
    return ls


# ----------------------------------------------------------------------------- tests


def test_two_nodes_zero3_match_single_machine(slurm_cluster, job_env, host_run, tmp_path):
    """sbatch --nodes 2: one torchrun per node (1 process on a CPU node), c10d at the first host."""
    out = tmp_path / "run"
    job = sbatch_train(slurm_cluster, job_env, out, "--nodes=2", extra=["--train.max_steps", str(STEPS)])
    assert_completed(slurm_cluster, job, out)
    stage = out / "sft"
    assert losses(stage) == pytest.approx(host_run, rel=1e-5, abs=1e-6)
    assert (stage / "done").exists() and (stage / "export").is_dir()
    logs = {f.name: f.read_text() for f in (stage / f"slurm-{job}").glob("*.log")}
    assert set(logs) == {"job.log", "node1.log", "node2.log"}, sorted(logs)
    addr = slurm_cluster.addr
    for node in ("node1", "node2"):
        assert "1 process(es)" in logs[f"{node}.log"]
        assert f"address {addr[node]} (eth0)" in logs[f"{node}.log"]  # not 127.x: the node's own address
        assert f"--rdzv_endpoint={addr['node1']}:" in logs[f"{node}.log"]  # first host of the node list
    # the progress bar only on global rank 0: exactly one node shows it
    assert sum(f"{STEPS}/{STEPS}" in logs[f"{n}.log"] for n in ("node1", "node2")) == 1


def test_sequence_parallel_across_two_nodes(slurm_cluster, job_env, host_run, tmp_path):
    """--deepspeed.sequence_parallel_size 2 over 2 nodes x 1 process: Ulysses' all-to-all crosses the nodes, and
    the losses are those of the data-parallel run on this machine (the objective does not depend on the split)."""
    out = tmp_path / "run"
    job = sbatch_train(slurm_cluster, job_env, out, "--nodes=2",
                       extra=["--train.max_steps", str(STEPS), "--deepspeed.sequence_parallel_size", "2",
                              "--train.export", "false"])
    assert_completed(slurm_cluster, job, out)
    assert losses(out / "sft") == pytest.approx(host_run, rel=1e-4, abs=1e-6)
    meta = json.loads((out / "sft" / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert meta["sequence_parallel_size"] == 2 and meta["world_size"] == 2


def test_preempted_job_requeues_and_resumes(slurm_cluster, job_env, host_run, tmp_path):
    """USR1 to the batch shell (as --signal=B:USR1@... does before the time limit): checkpoint, requeue, resume."""
    out = tmp_path / "run"
    stage = out / "sft"
    job = sbatch_train(slurm_cluster, job_env, out, "--nodes=2", extra=["--train.max_steps", str(STEPS)])
    wait_for_steps(slurm_cluster, job, stage, 1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=job_env, check=True)
    assert_completed(slurm_cluster, job, out, timeout=300)
    log = (stage / f"slurm-{job}" / "job.log").read_text()
    assert "USR1" in log and f"requeueing job {job}" in log and "restart 1" in log, log
    assert (stage / "done").exists() and not (stage / "preempted").exists(), log
    # the second run started from the checkpoint the first one saved before the last step
    nodes = job_logs(stage, job, tail=10**6)
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", nodes)
    assert resumed and 0 < int(resumed[0][0]) < STEPS, nodes[-3000:]
    assert losses(stage) == pytest.approx(host_run, rel=1e-5, abs=1e-6), job_logs(stage, job)


def test_pipeline_sft_redi_eval(slurm_cluster, job_env, tmp_path):
    """pipeline.sh: SFT, REDI from the SFT export, eval of the REDI export, chained with afterok.

    One node with two (imitated) GPUs: --nproc_per_node follows the GPUs Slurm gave the node.
    """
    out = tmp_path / "run"
    r = subprocess.run(["bash", PIPELINE, "--nodes", "1", "--gpus-per-node", "2", *FAST, "--train.max_steps", "2",
                        "--eval.limit", "2", "--eval.max_new_tokens", "8", "--eval.benchmarks", "math500",
                        "--run.output_dir", str(out)],
                       cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    ids = dict(re.findall(r"^\s*(sft|redi|eval)\s+job (\d+)", r.stdout, re.M))
    assert set(ids) == {"sft", "redi", "eval"}, r.stdout
    assert f"{out}/redi/export" in r.stdout
    for name in ("sft", "redi", "eval"):
        info = slurm_cluster.wait(int(ids[name]), 300)
        batch = "\n".join(p.read_text() for p in (out / "slurm").glob(f"*-{ids[name]}.out"))
        assert info["JobState"] == "COMPLETED", (
            f"{name} job: {info['JobState']} {info.get('ExitCode')}\n{batch}\n"
            f"{job_logs(out / name) if name != 'eval' else ''}")
    for name in ("sft", "redi"):
        assert (out / name / "done").exists()
        assert "2 process(es)" in (out / name / f"slurm-{ids[name]}" / "node1.log").read_text()
    assert len(losses(out / "redi")) == 2
    cfg = (out / "redi" / "config.yaml").read_text()  # REDI from the SFT export, never a fresh SFT
    assert re.search(r"name_or_path: '?@sft'?", cfg) and "sft_if_missing: false" in cfg, cfg
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["model"] == f"{out}/redi/export"
    assert summary["benchmarks"]["math500"]["num_problems"] == 2


def test_killed_rank_fails_the_job(slurm_cluster, job_env, tmp_path):
    """A rank that dies on one node ends the whole job, with that rank's failure in its node's log, no hang."""
    out = tmp_path / "run"
    stage = out / "sft"
    job = sbatch_train(slurm_cluster, job_env, out, "--nodes=2", extra=["--train.max_steps", "500"])
    wait_for_steps(slurm_cluster, job, stage, 1)

    def workers(node: str) -> list[int]:
        pids = []
        for pid in slurm_cluster.node_pids(node):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(c.endswith(b"launch/train.py") for c in cmd) and b"torch.distributed.run" not in cmd:
                pids.append(pid)
        return pids

    victims = workers("node2")
    assert victims, f"no trainer process in node2\n{job_logs(stage)}"
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    info = slurm_cluster.wait(job, 120)
    took = time.monotonic() - t0
    assert info["JobState"] in ("FAILED", "CANCELLED"), info
    assert took < 90, f"the job took {took:.0f}s to fail"
    node2 = (stage / f"slurm-{job}" / "node2.log").read_text()
    assert re.search(r"exitcode\s*:\s*-9", node2), node2[-3000:]
    summary = (stage / f"slurm-{job}" / "job.log").read_text()
    assert "FAILED" in summary and re.search(r"node2: host: node2; rank: \d.*; exitcode: -9", summary), summary
    assert not (stage / "done").exists()
    deadline = time.monotonic() + 30
    while (workers("node1") or workers("node2")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not workers("node1") and not workers("node2"), "trainer processes left behind"
