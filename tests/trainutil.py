"""Helpers for the multi-process training tests: run launch/train.py under torchrun on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")

# the tiny model on the bundled character-level `arith` tokenizer (vocabulary 64): tests whose point is not the
# vocabulary pay for a 64-row head, not Qwen's 151,936 rows (~1.8 s a step on 2 ranks); a few keep Qwen's
ARITH = ["--model.tokenizer", "arith", "--model.chat_template", "null", "--model.tiny.vocab_size", "64",
         "--data.system_prompt", "null"]
# small, fast, really partitioned (persistence threshold 0), no tracking unless a test asks
FAST = ["--config", "tiny", "--data.synthetic_size", "48", "--train.global_batch_size", "8",
        "--train.micro_batch_size", "2", "--deepspeed.zero", "{stage3_param_persistence_threshold: 0}",
        "--tracking.enabled", "false", "--eval.benchmarks", "[]", "--eval.heldout_every", "0", *ARITH]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp: Path) -> dict:
    env = dict(os.environ)
    tmpdir = tmp / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


RUN_CONFIGS = str(ROOT / "tests" / "run_configs.py")


def python_train(args: list[str], tmp: Path, timeout: int = 900, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """One process, no launcher: what the process itself prints is all there is (torchrun adds its own
    ChildFailedError traceback when a worker exits non-zero)."""
    r = subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, env=env or env_for(tmp), capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def torchrun(args: list[str], tmp: Path, nproc: int = 2, timeout: int = 900, env: dict | None = None,
             check: bool = True, script: str = TRAIN) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env or env_for(tmp), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def run_configs(runs: list[list[str]], tmp: Path, nproc: int, timeout: int = 1800) -> None:
    """Train each argument list in turn inside one torchrun (tests/run_configs.py)."""
    import json as _json

    torchrun([_json.dumps(runs)], tmp, nproc=nproc, timeout=timeout, script=RUN_CONFIGS)


def losses(stage_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]
