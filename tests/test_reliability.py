"""Reliability, round 3: bad inputs are one line (or a counted skip), never a traceback or a silent acceptance;
interrupted runs recover with the same command. Each test names the item it reproduces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from redi_ds.config import load_config
from redi_ds.data import DataError
from redi_ds.data.layout import PAIRS, SFT_ROWS
from redi_ds.data.sources import load_source
from redi_ds.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _yaml(tmp_path, text: str) -> str:
    f = tmp_path / "c.yaml"
    f.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(f)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("text,message", [
    ("train:\n  lr: 1.0e-3\n  lr: 1.0e-2\n", r":3: duplicate key 'lr' \(first at line 2\)"),
    ("data: {path: synthetic}\ndata: {path: x}\n", r":2: duplicate key 'data'"),
    ("stages:\n  sft: 3\n", r"stages.sft must be a mapping of overrides, got 3"),
    (b"run:\n  name: caf\xe9\n", r":2: not UTF-8 \(byte 0xe9\)"),
    ("a: " + "[" * 20000 + "]" * 20000 + "\n", r"(nested too deeply|invalid YAML)"),
])
def test_bad_yaml_is_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_yaml(tmp_path, text), stage="sft")


def test_config_naming_a_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"--config '.*' is a folder; name a YAML file"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("override,message", [
    (["--train.min_lr_ratio", "1.5"], r"train.min_lr_ratio = 1.5; must be in \[0, 1\]"),
    (["--train.epochs", "-1"], r"train.epochs = -1; must be >= 0"),
    (["--data.limit", "-3"], r"data.limit = -3 must be >= 0"),
    (["--data.synthetic_size", "0"], r"data.synthetic_size = 0 >= 1"),
    (["--model.rope_theta", ".inf"], r"model.rope_theta = inf; must be a finite number > 0"),
    (["--model.max_position_embeddings", "128"], r"model.max_position_embeddings = 128 is below data.max_length"),
    (["--model.tiny.hidden_size", "0"], r"model.tiny.hidden_size = 0; sizes must be >= 1"),
    (["--model.tiny.num_attention_heads", "5"], r"num_attention_heads \(5\) must divide hidden_size \(64\)"),
    (["--eval.benchmarks", "[mathh500]"], r"eval: unknown benchmark 'mathh500'"),
    (["--eval.backend", "tgi"], r"eval: unknown backend 'tgi'"),
    (["--eval.temperature", ".inf"], r"eval: need a finite temperature"),
])
def test_values_that_change_results_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", stage="sft", overrides=override)


def test_deepspeed_json_non_utf8_and_duplicates(tmp_path):
    from redi_ds import ds_config
    from redi_ds.config import DeepSpeedConfig

    bad = tmp_path / "ds.json"
    bad.write_bytes(b'{"zero_optimization": {"stage": 3},\n "bf16": {"enabled": "\xff"}}')
    with pytest.raises(ConfigError, match=r"ds.json:2: not UTF-8 \(byte 0xff\)"):
        ds_config.load(DeepSpeedConfig(config=str(bad)))
    bad.write_text('{"zero_optimization": {"stage": 3}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match=r"duplicate key 'zero_optimization'"):
        ds_config.load(DeepSpeedConfig(config=str(bad)))


def test_a_chat_template_with_a_syntax_error_is_one_line(tmp_path):
    from redi_ds.config import ModelConfig
    from redi_ds.model import load_tokenizer

    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"model.chat_template: .*t.jinja: line 2: Jinja syntax error"):
        load_tokenizer(ModelConfig(tokenizer="arith", chat_template=str(t)), "tiny")


# ----------------------------------------------------------------------------- data


def _jsonl(tmp_path, lines: list, name="d.jsonl") -> str:
    f = tmp_path / name
    f.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return str(f)


GOOD = '{"prompt": "p", "chosen": "c", "rejected": "r"}'


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "chosen": "d"}', r":2: duplicate key 'chosen'"),
    ('{"prompt": "p", "chosen": "\\ud800", "rejected": "r"}', r":2: field 'chosen' holds a lone surrogate"),
    ('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}", r":2: JSON nested too deeply"),
    (b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}', r":2: not UTF-8 \(byte 0xff at column 14\)"),
])
def test_training_jsonl_bad_lines_are_one_line(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        load_source(_jsonl(tmp_path, [GOOD, line]), PAIRS)


def test_a_bom_on_the_first_line_is_accepted(tmp_path):
    ds = load_source(_jsonl(tmp_path, [b"\xef\xbb\xbf" + GOOD.encode(), GOOD]), PAIRS)
    assert len(ds) == 2 and ds[0]["prompt"] == "p"


def test_a_folder_of_jsonl_names_the_bad_file_and_line(tmp_path):
    _jsonl(tmp_path, [GOOD, GOOD], "a.jsonl")
    _jsonl(tmp_path, [GOOD, '{"prompt": "p", "chosen": "c"}'], "b.jsonl")
    with pytest.raises(DataError, match=r"b.jsonl:2: missing field 'rejected'"):
        load_source(str(tmp_path), PAIRS)
    (tmp_path / "b.jsonl").unlink()
    assert len(load_source(str(tmp_path), PAIRS)) == 2


def test_an_empty_parquet_is_named_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), f)
    with pytest.raises(DataError, match=r"e.parquet: empty \(no rows\)"):
        load_source(str(f), SFT_ROWS)


# ----------------------------------------------------------------------------- eval


def test_eval_bench_file_bad_lines_and_bom(tmp_path):
    from redi_ds.eval.benchmarks import load_benchmark
    from redi_ds.eval.errors import EvalError

    ok = '{"id": 1, "problem": "p", "answer": "1"}'
    for line, message in (('{"id": 2, "problem": "q", "answer": "2", "answer": "3"}', r":2: duplicate key"),
                          ('{"id": 2, "problem": "\\udc80", "answer": "2"}', r":2: field 'problem' holds a lone")):
        with pytest.raises(EvalError, match=message):
            load_benchmark(_jsonl(tmp_path, [ok, line]))
    assert len(load_benchmark(_jsonl(tmp_path, [b"\xef\xbb\xbf" + ok.encode()]))) == 1


def test_eval_model_folder_without_tokenizer_is_one_line(tmp_path):
    import transformers

    from redi_ds.eval import run_eval
    from redi_ds.eval.errors import EvalError
    from redi_ds.eval.options import EvalOptions

    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(EvalError, match=r"m has no tokenizer files .*pass --tokenizer"):
        run_eval(str(tmp_path / "m"), "math500", EvalOptions(limit=1, max_new_tokens=2, backend="hf"),
                 out_dir=str(tmp_path / "out"), print_table=False, progress=False)


@pytest.mark.parametrize("out", ["file", "under_file", "proc"])
def test_output_folders_under_a_file_or_virtual_are_one_line(tmp_path, out):
    from redi_ds.textio import writable_dir

    (tmp_path / "f").write_text("x")
    path = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "out", "proc": Path("/proc/self/out")}[out]
    with pytest.raises(ConfigError, match={"file": "is a file, not a folder", "under_file": "which is a file",
                                           "proc": "is on a virtual file system"}[out]):
        writable_dir(str(path), "--out")
    assert not (tmp_path / "f").is_dir()


def test_read_only_output_folder_is_one_line(tmp_path):
    from redi_ds.textio import writable_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        ro.chmod(0o500)
        if os.access(ro, os.W_OK):  # root ignores modes: a read-only mount is the only way here
            pytest.fail(f"cannot make a read-only folder here: {r.stderr.decode().strip()}")
    try:
        with pytest.raises(ConfigError, match=r"run.output_dir = '.*ro/run' cannot be written"):
            writable_dir(str(ro / "run"), "run.output_dir")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# ----------------------------------------------------------------------------- prepare and negatives


def _prepare_opts(tmp_path, source, **kw):
    from redi_ds.data.prepare import PrepareOptions, RECIPES

    base = dict(RECIPES["redi-paper"])
    base.update(source=source, out=str(tmp_path / "out"), decontam=False, quiet=True, flags="auto",
                require_valid=False, exclude_sources=(), tokenizer="arith", chat_template=None,
                max_prompt_tokens=0, max_response_tokens=0, sft_max_tokens=0)
    base.update(kw)
    return PrepareOptions(**{k: v for k, v in base.items() if k in PrepareOptions.__dataclass_fields__})


@pytest.mark.parametrize("kw,message", [
    ({"ngram": 0}, r"--ngram must be >= 1 \(got 0\)"),
    ({"decontam_threshold": 0.0}, r"--decontam-threshold must be in \(0, 1\]"),
    ({"decontam_threshold": 1.5}, r"--decontam-threshold must be in \(0, 1\]"),
    ({"max_pairs": -1}, r"--max-pairs must be >= 0"),
    ({"max_prompt_tokens": -5}, r"--max-prompt-tokens must be >= 0"),
    ({"sft_max_tokens": -1}, r"--sft-max-tokens must be >= 0"),
])
def test_prepare_options_that_change_the_output_are_refused(tmp_path, kw, message):
    from redi_ds.data.prepare import PrepareError, prepare

    src = _jsonl(tmp_path, ['{"problem": "1+1", "answer": "2", "response": "\\\\boxed{2}"}'])
    with pytest.raises(PrepareError, match=message):
        prepare(_prepare_opts(tmp_path, src, **kw))
    assert not (tmp_path / "out").exists()


def test_prepare_counts_nan_answers_and_surrogates_and_accepts_a_bom(tmp_path):
    from redi_ds.data.prepare import prepare

    rows = [b"\xef\xbb\xbf" + b'{"problem": "1+1", "answer": "2", "response": "so \\\\boxed{2}"}',
            b'{"problem": "1+1", "answer": "2", "response": "so \\\\boxed{3}"}',
            b'{"problem": "2+2", "answer": NaN, "response": "so \\\\boxed{4}"}',
            b'{"problem": "3+3", "answer": "6", "response": "\\ud800"}']
    stats = prepare(_prepare_opts(tmp_path, _jsonl(tmp_path, rows)))
    bad = stats["bad_rows"] if "bad_rows" in stats else stats["counts"]["bad_rows"]
    text = json.dumps(stats)
    assert "non_finite_answer" in text and "lone_surrogate" in text and "invalid_json" not in text, bad


def test_negatives_checks_out_and_data_before_any_sampling(tmp_path, capsys):
    from redi_ds.data.negatives import NegativesError, load_problems, main

    (tmp_path / "f").write_text("x")
    data = _jsonl(tmp_path, ['{"problem": "p", "response": "r", "answer": "1", "answer": "2"}'])
    assert main(["--model", str(tmp_path / "nomodel"), "--data", data, "--out", str(tmp_path / "f" / "o")]) == 2
    assert "under" in capsys.readouterr().err
    with pytest.raises(NegativesError, match=r"d.jsonl:1: duplicate key 'answer'"):
        load_problems(data)
    bad = _jsonl(tmp_path, [b'{"problem": "p\xfe", "response": "r", "answer": "1"}'], "b.jsonl")
    with pytest.raises(NegativesError, match=r"b.jsonl:1: not UTF-8"):
        load_problems(bad)


# ----------------------------------------------------------------------------- stage files and checkpoints


def test_a_torn_last_metrics_line_is_dropped(tmp_path, capsys):
    from redi_ds.stage import StageDir

    stage = StageDir(tmp_path)
    stage.metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    stage.truncate_metrics(2)
    assert stage.metrics.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert "dropping its last line, torn" in capsys.readouterr().out


def _fake_checkpoint(root: Path, step: int, files: dict[str, int]) -> Path:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    for name, size in files.items():
        (d / name).write_bytes(b"x" * size)
    (d / "meta.json").write_text(json.dumps({"step": step, "files": files}))
    return d


@pytest.mark.parametrize("damage", ["garbage_pointer", "missing_step", "truncated_shard"])
def test_latest_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, damage, capsys):
    from redi_ds.checkpoints import CheckpointStore

    store = CheckpointStore(tmp_path, 0)
    shards = {"zero_pp_rank_0_mp_rank_00_model_states.pt": 100, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 300}
    _fake_checkpoint(store.root, 2, shards)
    newest = _fake_checkpoint(store.root, 4, shards)
    (store.root / "latest").write_text("step_4")
    assert store.latest() == newest
    if damage == "garbage_pointer":
        (store.root / "latest").write_bytes(b"\x00\xff\xfe garbage")
        expect = newest
    elif damage == "missing_step":
        (store.root / "latest").write_text("step_6")
        expect = newest
    else:
        shard = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:150])
        expect = store.root / "step_2"
    assert store.latest() == expect
    assert "using the newest checkpoint that verifies: " + str(expect) in capsys.readouterr().out


def test_config_differences_name_only_what_trains():
    from redi_ds.stage import config_differences

    saved = load_config("tiny", stage="sft").to_dict()
    now = load_config("tiny", stage="sft", overrides=["--train.lr", "1e-2", "--eval.samples", "4",
                                                      "--tracking.enabled", "false"]).to_dict()
    assert config_differences(saved, now) == [("train.lr", 3e-3, 1e-2)]


# ----------------------------------------------------------------------------- end to end


def _train(tmp_path, out, *extra, check=True, env=None):
    from trainutil import FAST, python_train

    return python_train(["--stage", "sft", *FAST, "--train.max_steps", "4", "--train.save_every", "2",
                         "--run.output_dir", str(out), *extra], tmp_path, env=env, check=check)


def _error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_run_output_dir_that_cannot_be_written_is_one_line_before_the_data(tmp_path):
    (tmp_path / "f").write_text("x")
    for out, message in ((tmp_path / "f" / "run", "which is a file, not a folder"),
                         (Path("/proc/self/redi"), "is on a virtual file system")):
        assert message in _error(_train(tmp_path, out, check=False))


@pytest.mark.slow
def test_a_finished_stage_is_never_retrained_or_rewritten_by_another_config(tmp_path):
    from trainutil import losses

    out = tmp_path / "run"
    _train(tmp_path, out)
    before = (out / "sft" / "config.yaml").read_text()
    err = _error(_train(tmp_path, out, "--train.lr", "1e-2", check=False))
    assert "is a finished stage trained with another config: train.lr (0.003 -> 0.01)" in err
    assert "--run.resume never" in err and (out / "sft" / "config.yaml").read_text() == before
    assert "already done" in _train(tmp_path, out, "--eval.samples", "3").stdout  # not training-relevant
    assert len(losses(out / "sft")) == 4


@pytest.mark.slow
def test_damaged_checkpoints_and_metrics_resume_from_the_newest_good_one(tmp_path):
    """A run stopped after step 4 of 6, then damaged three ways at once (a torn metrics line, `latest` naming a
    missing step, step_4's optimizer shard cut in half): the same command resumes from step_2 and finishes with
    the uninterrupted run's losses."""
    from trainutil import losses

    steps = ["--train.max_steps", "6"]
    whole = tmp_path / "whole"
    _train(tmp_path, whole, *steps)
    out = tmp_path / "cut"
    _train(tmp_path, out, *steps, "--train.stop_after_steps", "4")
    ck = out / "sft" / "checkpoints"
    shard = next((ck / "step_4").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (ck / "latest").write_text("step_9")
    with open(out / "sft" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    r = _train(tmp_path, out, *steps)
    assert f"using the newest checkpoint that verifies: {ck / 'step_2'}" in r.stdout
    assert "resumed from" in r.stdout and "step_2 at step 2" in r.stdout
    assert losses(out / "sft") == pytest.approx(losses(whole / "sft"), rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_redi_after_an_sft_killed_during_its_export(tmp_path):
    """A SIGKILL during the SFT export leaves a half-written export and no done marker: `--stage redi` finishes the
    SFT stage first (sft_if_missing), or says in one line that it is not finished."""
    from trainutil import FAST, python_train

    out = tmp_path / "run"
    _train(tmp_path, out, "--train.export", "true")
    sft = out / "sft"
    (sft / "done").unlink()
    (sft / "export" / "config.json").write_text("")  # what a kill mid-export leaves
    redi = ["--stage", "redi", *FAST, "--train.max_steps", "1", "--run.output_dir", str(out)]
    err = _error(python_train([*redi, "--model.sft_if_missing", "false"], tmp_path, check=False))
    assert "the sft stage in" in err and "is not finished (no done marker)" in err
    r = python_train(redi, tmp_path)
    assert (sft / "done").exists() and json.loads((sft / "export" / "config.json").read_text())
    assert (out / "redi" / "done").exists() and "stage redi done" in r.stdout


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_command_checkpoints_and_stops_its_workers(tmp_path):
    """SIGTERM to `deepspeed` kills that command at once; its launch.py and workers used to train on unsupervised.
    The workers notice their launcher is gone, checkpoint, write `preempted` and exit; the same command resumes."""
    from trainutil import FAST, env_for, free_port

    out = tmp_path / "run"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", "2", "--master_port",
           str(free_port()), str(ROOT / "launch" / "train.py"), "--stage", "sft", *FAST, "--train.epochs", "1000",
           "--train.max_steps", "5000", "--run.output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "sft" / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.5)
    proc.terminate()
    proc.wait(timeout=30)
    deadline = time.time() + 120
    while not (out / "sft" / "preempted").exists():
        assert time.time() < deadline, "the workers trained on after their launcher died"
        time.sleep(0.5)
    def alive() -> list[str]:
        found = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
        return [p for p in found if Path(f"/proc/{p}/stat").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]  # zombies have exited

    deadline = time.time() + 60
    while alive():
        assert time.time() < deadline, f"workers still running after their preemption checkpoint: {alive()}"
        time.sleep(0.5)
    latest = (out / "sft" / "checkpoints" / "latest").read_text()
    assert latest.startswith("step_")
