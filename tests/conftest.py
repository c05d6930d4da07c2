"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


# ----------------------------------------------------------------------------- training (shared)
@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """One 2-rank ZeRO-3 SFT run of 6 steps (checkpoints at 3 and 6, export), shared by the slow tests that
    compare against an uninterrupted run or need a 2-rank checkpoint."""
    from trainutil import FAST, torchrun

    out = tmp_path_factory.mktemp("sft")
    r = torchrun(["--stage", "sft", *FAST, "--train.max_steps", "6", "--train.save_every", "3",
                  "--run.output_dir", str(out)], out)
    return out, r


# ----------------------------------------------------------------------------- slurm (issue 6)
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A two-node Slurm cluster on this machine (tests/slurm_cluster.py), up for the whole session.

    Skips with a one-line reason when not root or Slurm/munge are missing; fails instead when
    CI=true (CI installs them with .ci/install_slurm.sh). Always torn down, also on failure.
    """
    import os

    from slurm_cluster import SlurmCluster, missing_requirements

    reason = missing_requirements()
    if reason:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    import signal

    def interrupted(signum, frame):  # SIGTERM: unwind like Ctrl-C so that the cluster is torn down
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, interrupted)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, gpus_per_node=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
