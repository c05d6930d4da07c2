"""Packaging: a light `import redi_ds`, no top-level `kernels` module, bundled data, lint."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_is_light(tmp_path):
    out = _run("import sys, redi_ds, redi_ds.config, redi_ds.kernels, redi_ds.losses, redi_ds.data, redi_ds.eval;"
               "print(sorted(m for m in ('triton', 'deepspeed', 'mlflow', 'vllm', 'transformers', 'datasets')"
               " if m in sys.modules))", tmp_path)
    assert out == "[]"


def test_kernels_ship_inside_redi_ds_only(tmp_path):
    out = _run("import importlib.util, redi_ds.kernels as k; print(importlib.util.find_spec('kernels'), "
               "k.__name__, hasattr(k, 'fused_linear_loss'))", tmp_path)
    assert out == "None redi_ds.kernels True"


def test_bundled_assets_resolve(tmp_path):
    out = _run("from importlib import resources as r; b = r.files('redi_ds');"
               "print(b.joinpath('assets/tokenizer/qwen2.5/tokenizer.json').is_file(),"
               " b.joinpath('configs/tiny.yaml').is_file(), b.joinpath('assets/eval/math500.jsonl').is_file(),"
               " r.files('redi_ds.ds_configs').joinpath('zero3.json').is_file())", tmp_path)
    assert out == "True True True True"


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    r = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_a_regular_install_trains(tmp_path):
    """`pip install .` (not -e): the DeepSpeed JSON, configs, tokenizer and eval sets ship as package data, so
    launch/train.py trains one step from a copy of the package outside the source tree."""
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**__import__("os").environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import redi_ds, redi_ds.ds_configs as d; print(redi_ds.__file__,"
                            " d.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(site)) and where.stdout.split()[1].startswith(str(site)), where
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--stage", "sft", "--train.max_steps", "1",
                        "--data.synthetic_size", "16", "--tracking.enabled", "false", "--train.export", "false",
                        "--run.output_dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "sft" / "checkpoints" / "step_1" / "meta.json").is_file()
    assert "held-out log-prob per token (step 0 -> 1)" in r.stdout  # the bundled held-out pairs shipped too


def test_install_requires_a_transformers_that_packs_with_sdpa():
    """transformers < 4.56 silently lets packed sequences attend across boundaries under sdpa (no packing
    detection from position_ids) and lacks the dtype= keyword: the package must not install with one."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    reqs = {r.name: r for r in map(Requirement, requires("redi-ds"))}
    spec = reqs["transformers"].specifier
    assert "4.56.0" in spec and "4.55.4" not in spec
