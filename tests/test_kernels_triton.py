"""The Triton kernel in the CPU interpreter (TRITON_INTERPRET=1, fp32), against the float64 reference.

The interpreter must be switched on before triton is first imported in the process, and switching it on
inside a shared pytest session would also turn every later @triton.jit (liger-kernel's, say) into an
interpreted function. So this test runs the impl="triton" cases of tests/test_kernels.py in a fresh
subprocess with TRITON_INTERPRET=1 in its environment from the start: the order in which pytest collects
or imports anything in this session does not matter. Inside that subprocess (or when you run
`TRITON_INTERPRET=1 pytest tests/test_kernels.py -k triton` yourself) the triton cases run in-process.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from xml.etree import ElementTree

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_in_interpreter_matches_reference(tmp_path):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already in an interpreter process: the triton cases of test_kernels.py run directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    report = tmp_path / "triton.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton and not importing and not gpu",
           f"--junitxml={report}", str(HERE / "test_kernels.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"interpreter run failed (rc={r.returncode}):\n{out[-6000:]}"
    # guard against a silent no-op: the subprocess must have run and passed the triton cases (its JUnit report)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= 8 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0, out[-2000:]
