"""Packaging: the layout cannot shadow a PyPI package, the wheel ships every module and asset, `redi-ds` runs
from a regular install, `import redi_ds` is light, lint is clean."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd, env=None) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel --no-deps .` builds from this checkout (no build isolation: offline)."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(out), "."], cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (whl,) = out.glob("redi_ds-*.whl")
    return whl


# ----------------------------------------------------------------------------- nothing shadows PyPI's `kernels`


def test_the_checkout_shadows_no_pypi_package(tmp_path):
    """transformers imports PyPI's `kernels`: from the repo root (where `python -m` and `python -c` put the
    checkout first on sys.path) it must still be PyPI's. A top-level `kernels/__init__.py` broke all three."""
    env = _env()
    if importlib.util.find_spec("kernels") is None:  # an older transformers: plant a stand-in of the real package
        stand_in = tmp_path / "site" / "kernels"
        stand_in.mkdir(parents=True)
        (stand_in / "__init__.py").write_text("CUDAProperties = object\n")
        env["PYTHONPATH"] = str(tmp_path / "site")
    where = _run("import kernels, os; print(os.path.dirname(os.path.abspath(kernels.__file__)))", ROOT, env)
    assert where != str(ROOT / "kernels"), where
    _run("from kernels import CUDAProperties", ROOT, env)
    _run("import transformers.modeling_utils", ROOT, env)
    r = subprocess.run([sys.executable, "-m", "redi_ds.eval", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--bench" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "w"), "."], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_no_top_level_folder_is_a_package():
    """Only redi_ds is importable as a regular package from a checkout; scripts' folders have no __init__.py."""
    packages = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(".") and (p / "__init__.py").exists())
    assert packages == ["redi_ds"]
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert modules == ["setup.py"]


def test_kernels_import_nothing_above_them(tmp_path):
    """redi_ds.kernels knows no trainer, config, loss or model: neither its source nor its import does."""
    src = ROOT / "redi_ds" / "kernels"
    assert (src / "fused.py").is_file() and not (ROOT / "kernels" / "__init__.py").exists()
    for f in src.glob("*.py"):
        for line in f.read_text().splitlines():
            s = line.strip()
            if s.startswith(("from redi_ds", "import redi_ds")):
                assert s.split()[1].startswith("redi_ds.kernels"), f"{f.name}: {s}"
    out = _run("import sys, redi_ds.kernels, redi_ds.kernels.engine, redi_ds.kernels.fused;"
               "print(sorted(m for m in sys.modules if m.startswith('redi_ds') and m != 'redi_ds'"
               " and not m.startswith('redi_ds.kernels')))", tmp_path)
    assert out == "[]"


# ----------------------------------------------------------------------------- the wheel


def _source_files() -> set[str]:
    """Every file under redi_ds/ in the source tree (tracked by git where there is a checkout)."""
    r = subprocess.run(["git", "ls-files", "redi_ds"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return {ln for ln in r.stdout.splitlines() if (ROOT / ln).is_file()}
    return {str(p.relative_to(ROOT)) for p in (ROOT / "redi_ds").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_holds_every_module_and_asset_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    assert top == {"redi_ds", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    shipped = {n for n in names if n.startswith("redi_ds/")}
    missing = sorted(_source_files() - shipped)
    assert not missing, f"not in the wheel: {missing[:10]}"
    subpackages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "redi_ds").rglob("__init__.py")}
    assert {"redi_ds/ablation", "redi_ds/kernels", "redi_ds/eval", "redi_ds/data", "redi_ds/losses"} <= subpackages
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "redi-ds = redi_ds.__main__:main" in entry


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) into a folder of its own, outside the source tree."""
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return site


def test_redi_ds_command_from_a_regular_install(installed, tmp_path):
    env = _env(PYTHONPATH=str(installed))
    where = _run("import redi_ds; print(redi_ds.__file__)", tmp_path, env)
    assert where.startswith(str(installed)), where
    r = subprocess.run([str(installed / "bin" / "redi-ds"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("train", "prepare", "eval", "negatives", "ablation"):
        assert f"\n  {command} " in r.stdout
        sub = subprocess.run([sys.executable, "-m", "redi_ds", command, "--help"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: redi-ds {command}"), sub.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "redi_ds", "trian"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown command 'trian'" in bad.stderr


@pytest.mark.slow
def test_a_regular_install_trains(installed, tmp_path):
    """The DeepSpeed JSON, configs, tokenizer and held-out pairs ship as package data: `redi-ds train` trains one
    step from the installed copy, outside the source tree."""
    env = _env(PYTHONPATH=str(installed), OMP_NUM_THREADS="1")
    r = subprocess.run([str(installed / "bin" / "redi-ds"), "train", "--stage", "sft", "--train.max_steps", "1",
                        "--data.synthetic_size", "16", "--tracking.enabled", "false", "--train.export", "false",
                        "--run.output_dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "sft" / "checkpoints" / "step_1" / "meta.json").is_file()
    assert "held-out log-prob per token (step 0 -> 1)" in r.stdout  # the bundled held-out pairs shipped too


# ----------------------------------------------------------------------------- light import, pins, lint


def test_import_is_light(tmp_path):
    out = _run("import sys, redi_ds, redi_ds.config, redi_ds.kernels, redi_ds.losses, redi_ds.data, redi_ds.eval;"
               "print(sorted(m for m in ('triton', 'deepspeed', 'mlflow', 'vllm', 'transformers', 'datasets')"
               " if m in sys.modules))", tmp_path)
    assert out == "[]"


def test_bundled_assets_resolve(tmp_path):
    out = _run("from importlib import resources as r; b = r.files('redi_ds');"
               "print(b.joinpath('assets/tokenizer/qwen2.5/tokenizer.json').is_file(),"
               " b.joinpath('configs/tiny.yaml').is_file(), b.joinpath('assets/eval/math500.jsonl').is_file(),"
               " b.joinpath('ds_configs/zero3.json').is_file())", tmp_path)
    assert out == "True True True True"


def test_constraints_pin_every_direct_dependency():
    """`pip install -c constraints-cpu.txt` gives the tested set: each install_requires / test extra is pinned."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pinned = {}
    for line in (ROOT / "constraints-cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pinned[req.name.lower().replace("_", "-")] = req
    for spec in requires("redi-ds"):
        req = Requirement(spec)
        if req.marker is not None and "extra" in str(req.marker) and "test" not in str(req.marker):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pinned and str(pinned[name].specifier).startswith("=="), f"{name} is not pinned"


def test_install_requires_a_transformers_that_packs_with_sdpa():
    """transformers < 4.56 silently lets packed sequences attend across boundaries under sdpa (no packing
    detection from position_ids) and lacks the dtype= keyword: the package must not install with one."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    reqs = {r.name: r for r in map(Requirement, requires("redi-ds"))}
    spec = reqs["transformers"].specifier
    assert "4.56.0" in spec and "4.55.4" not in spec


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    r = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
