"""End to end: the tiny random Qwen2 model through the CLI and ``run_eval``, the summary math against
hand-computed values, data-parallel sharding, MLflow logging, and one-line CLI errors."""

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import redi_ds
from redi_ds.eval import EvalError, EvalOptions, load_benchmark, run_eval, runner
from redi_ds.eval.__main__ import main
from redi_ds.eval.backends import BACKENDS, Completion, Generator
from redi_ds.eval.prompting import PAPER_INSTRUCTION, build_prompt, load_tokenizer

ROOT = Path(redi_ds.__file__).resolve().parents[1]
TOKENIZER_DIR = Path(redi_ds.__file__).resolve().parent / "assets" / "tokenizer" / "qwen2.5"
SAMPLE_KEYS = {"benchmark", "problem_id", "sample_index", "response", "extracted_answer", "gold", "correct",
               "num_tokens", "finish_reason"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Qwen2 model with the bundled Qwen2.5 tokenizer and the Qwen2.5-Math chat template."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.chat_template = (TOKENIZER_DIR / "chat_template_qwen2.5_math.jinja").read_text()
    tok.save_pretrained(path)
    return str(path)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _read_samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _check_summary_against_samples(summary: dict, samples: list[dict], k: int) -> None:
    """Recompute pass@1, its standard error and the mean length by hand from samples.jsonl."""
    by_bench = defaultdict(lambda: defaultdict(dict))
    for s in samples:
        assert set(s) == SAMPLE_KEYS
        by_bench[s["benchmark"]][s["problem_id"]][s["sample_index"]] = s
    assert set(by_bench) == set(summary["benchmarks"])
    for bench, problems in by_bench.items():
        b = summary["benchmarks"][bench]
        assert b["num_problems"] == len(problems) and b["samples"] == k
        assert all(sorted(p) == list(range(k)) for p in problems.values())
        pass1 = sum(sum(p[j]["correct"] for j in range(k)) / k for p in problems.values()) / len(problems)
        assert b["pass@1"] == pytest.approx(pass1)
        run_scores = [sum(p[j]["correct"] for p in problems.values()) / len(problems) for j in range(k)]
        mean = sum(run_scores) / k
        if k > 1:
            se = math.sqrt(sum((x - mean) ** 2 for x in run_scores) / (k - 1)) / math.sqrt(k)
            assert b["pass@1_stderr"] == pytest.approx(se)
        lengths = [s["num_tokens"] for p in problems.values() for s in p.values()]
        assert b["mean_response_tokens"] == pytest.approx(sum(lengths) / len(lengths))
        truncated = sum(s["finish_reason"] == "length" for p in problems.values() for s in p.values())
        assert b["truncated_fraction"] == pytest.approx(truncated / len(lengths))


def test_import_is_light():
    code = ("import sys, redi_ds.eval; heavy = [m for m in ('torch', 'transformers', 'mlflow', 'math_verify', "
            "'sympy', 'matplotlib', 'vllm') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prompt_uses_chat_template_instruction_and_force_think(tiny_model):
    tok = load_tokenizer(tiny_model)
    text = build_prompt(tok, "What is 1+1?")
    assert text.startswith("<|im_start|>system\n" + PAPER_INSTRUCTION + "<|im_end|>\n<|im_start|>user\nWhat is 1+1?")
    assert text.endswith("<|im_start|>assistant\n")
    assert build_prompt(tok, "What is 1+1?", force_think=True).endswith("<|im_start|>assistant\n<think>\n")
    no_sys = build_prompt(tok, "Q", system_prompt=None, user_template="{problem}\nThink.")
    assert "user\nQ\nThink.<|im_end|>" in no_sys and no_sys.startswith("<|im_start|>system\n" + PAPER_INSTRUCTION)
    forced = build_prompt(load_tokenizer(tiny_model, chat_template="qwen2.5-math-force-think"), "Q", force_think=True)
    assert forced.endswith("<|im_start|>assistant<think>\n")  # REDI's template already opens <think>


def test_cli_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "redi_ds.eval", "--model", tiny_model, "--bench", "math500,amc", "--limit", "2",
           "--samples", "2", "--max-new-tokens", "8", "--batch-size", "3", "--out", str(out), "--no-progress",
           "--backend", "hf"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass@1 (k=2)" in proc.stdout and "average" in proc.stdout and "level" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    samples = _read_samples(out)
    assert len(samples) == (2 + 2) * 2
    assert [s["benchmark"] for s in samples] == ["math500"] * 4 + ["amc"] * 4
    assert all(1 <= s["num_tokens"] <= 8 and s["finish_reason"] in ("stop", "length") for s in samples)
    assert all(s["finish_reason"] == "stop" or s["num_tokens"] == 8 for s in samples)
    _check_summary_against_samples(summary, samples, k=2)
    assert summary["backend"] == "hf" and summary["samples"] == 2 and summary["max_new_tokens"] == 8
    assert set(summary["benchmarks"]["math500"]["by_level"]) and set(summary["benchmarks"]["math500"]["by_subject"])
    assert (out / "accuracy_by_level.png").stat().st_size > 1000


def test_api_data_parallel_ranks_match_a_single_rank(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    opts = EvalOptions(samples=2, temperature=0.0, max_new_tokens=5, limit=3, batch_size=1)
    common = dict(progress=False, print_table=False)
    # reference: one rank, an in-memory model
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ref = run_eval(model, ["aime24"], dataclasses.replace(opts, tokenizer=tiny_model), out_dir=tmp_path / "one",
                   world_size=1, rank=0, **common)
    ref_rows = _read_samples(tmp_path / "one")
    _check_summary_against_samples(ref, ref_rows, k=2)
    # two ranks sharing one folder (run one after the other: rank 1 writes its shard, rank 0 merges)
    assert run_eval(tiny_model, "aime24", opts, out_dir=tmp_path / "two", rank=1, world_size=2, **common) == {}
    assert (tmp_path / "two" / "shards" / "rank00001.done").exists()
    assert not (tmp_path / "two" / "samples.jsonl").exists()
    both = run_eval(tiny_model, "aime24", opts, out_dir=tmp_path / "two", rank=0, world_size=2, **common)
    rows = _read_samples(tmp_path / "two")
    assert [(r["problem_id"], r["sample_index"], r["response"]) for r in rows] == \
           [(r["problem_id"], r["sample_index"], r["response"]) for r in ref_rows]
    assert both["benchmarks"]["aime24"]["pass@1"] == ref["benchmarks"]["aime24"]["pass@1"]
    assert both["world_size"] == 2
    with pytest.raises(EvalError, match="out_dir"):
        run_eval(tiny_model, "aime24", opts, rank=0, world_size=2, **common)
    # rank 0 of a later run with other settings never merges rank 1's stale shard: it waits, then fails
    monkeypatch.setattr(runner, "GATHER_TIMEOUT", 1.0)
    with pytest.raises(EvalError, match=r"ranks \[1\] did not write"):
        run_eval(tiny_model, "aime24", dataclasses.replace(opts, samples=1), out_dir=tmp_path / "two", rank=0,
                 world_size=2, **common)


@pytest.mark.slow
def test_torchrun_two_ranks(tiny_model, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this interpreter")
    out = tmp_path / "tr"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "redi_ds.eval", "--model", tiny_model,
           "--bench", "aime24,amc23", "--limit", "3", "--samples", "2", "--max-new-tokens", "4", "--out", str(out),
           "--no-progress", "--backend", "hf"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("average") == 1  # only rank 0 prints the table
    shard_rows = [len(_read_samples_file(out / "shards" / f"rank{r:05d}.jsonl")) for r in range(2)]
    assert shard_rows == [6, 6]  # 6 problems split 3 / 3, two samples each
    samples = _read_samples(out)
    assert len(samples) == 12
    _check_summary_against_samples(json.loads((out / "summary.json").read_text()), samples, k=2)


def _read_samples_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- scripted backend


class ScriptedGenerator(Generator):
    """Returns fixed responses per problem: the summary math can then be checked by hand."""

    name = "scripted-test"
    script: dict = {}  # problem text -> [(response, num_tokens, finish_reason)] * k

    def __init__(self, model, *, tokenizer=None, chat_template=None, **_):
        self.tokenizer = load_tokenizer(model, tokenizer, chat_template)

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, progress=None):
        out = []
        for p in prompts:
            (script,) = [v for k, v in self.script.items() if k in p]
            out.append([Completion(*s) for s in script[:n]])
        if progress:
            progress(len(prompts))
        return out


@pytest.fixture
def scripted(tiny_model):
    aime = load_benchmark("aime24")[:3]
    assert [r["answer"] for r in aime] == ["204", "113", "371"]
    ScriptedGenerator.script = {
        aime[0]["problem"]: [(r"\boxed{204}", 10, "stop"), (r"\boxed{204.0}", 20, "stop"),
                             (r"\boxed{205}", 30, "stop"), (r"so \boxed{0204}", 40, "stop")],  # 1 1 0 1
        aime[1]["problem"]: [("no answer", 5, "length"), (r"\boxed{112}", 5, "length"),
                             (r"\boxed{113", 5, "length"), (r"\boxed{113} no, \boxed{114}", 5, "length")],  # 0 0 0 0
        aime[2]["problem"]: [(r"\boxed{371}", 1, "stop"), (r"\boxed{372}", 2, "stop"),
                             (r"\boxed{}", 3, "stop"), (r"\boxed{37.1}", 4, "stop")],  # 1 0 0 0
    }
    math500 = load_benchmark("math500")[:3]
    for row in math500:
        ScriptedGenerator.script[row["problem"]] = [(rf"\boxed{{{row['answer']}}}", 7, "stop")] * 2 + \
                                                   [("nothing", 7, "stop")] * 2
    BACKENDS[ScriptedGenerator.name] = ScriptedGenerator
    yield ScriptedGenerator.name
    BACKENDS.pop(ScriptedGenerator.name, None)


def test_summary_math_hand_computed(scripted, tiny_model, tmp_path, monkeypatch):
    # the Python API runs as one process unless told otherwise (a trainer calls it on rank 0 only)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = run_eval(tiny_model, "aime24", EvalOptions(backend=scripted, samples=4, limit=3), out_dir=tmp_path,
                       progress=False, print_table=False)
    samples = _read_samples(tmp_path)
    assert [s["correct"] for s in samples] == [True, True, False, True] + [False] * 4 + [True] + [False] * 3
    assert [s["extracted_answer"] for s in samples[4:8]] == [None, "112", None, "114"]
    b = summary["benchmarks"]["aime24"]
    # c = [[1,1,0,1],[0,0,0,0],[1,0,0,0]]: per-sample scores (2/3, 1/3, 0, 1/3)
    assert b["pass@1"] == pytest.approx(1 / 3)
    assert b["pass@1_stderr"] == pytest.approx(math.sqrt(2 / 27) / 2)
    assert b["pass@k"] == pytest.approx({"1": 1 / 3, "2": 0.5, "4": 2 / 3})
    assert b["mean_response_tokens"] == pytest.approx(130 / 12)
    assert b["truncated_fraction"] == pytest.approx(4 / 12)
    assert b["no_answer_fraction"] == pytest.approx(2 / 12)
    assert summary["average"]["pass@1"] == pytest.approx(1 / 3)
    _check_summary_against_samples(summary, samples, k=4)
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["aime24"]["pass@1"] == b["pass@1"]
    assert not (tmp_path / "accuracy_by_level.png").exists()  # aime24 has no levels
    assert summary["world_size"] == 1 and not (tmp_path / "shards").exists()


def test_mlflow_logging_to_the_training_run(scripted, tiny_model, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("train", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id  # the trainer's run
    out = tmp_path / "out"
    summary = run_eval(tiny_model, "aime24,math500", EvalOptions(backend=scripted, samples=4, limit=3), out_dir=out,
                       mlflow_run_id=run_id, tracking_uri=uri, progress=False, print_table=False)
    assert summary["mlflow"]["run_id"] == run_id
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/aime24/pass_at_1"] == pytest.approx(1 / 3)
    assert metrics["eval/aime24/pass_at_4"] == pytest.approx(2 / 3)
    assert metrics["eval/math500/pass_at_1"] == pytest.approx(0.5)
    for level in {r["level"] for r in load_benchmark("math500")[:3]}:
        assert metrics[f"eval/math500/level_{level}/pass_at_1"] == pytest.approx(0.5)
    assert metrics["eval/average/pass_at_1"] == pytest.approx((1 / 3 + 0.5) / 2)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert artifacts == {"eval/samples.jsonl", "eval/summary.json", "eval/accuracy_by_level.png"}


def test_mlflow_unreachable_warns_once_and_still_writes(scripted, tiny_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="redi_ds.eval.runner"):
        summary = run_eval(tiny_model, "aime24", EvalOptions(backend=scripted, samples=4, limit=3), out_dir=tmp_path,
                           mlflow_run_id="0123456789abcdef", tracking_uri="http://127.0.0.1:9",
                           progress=False, print_table=False)
    warnings = [r for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1
    assert "mlflow" not in summary
    assert (tmp_path / "samples.jsonl").exists() and (tmp_path / "summary.json").exists()


# ----------------------------------------------------------------------------- EvalOptions


def test_eval_options_defaults_types_and_cli_mapping(monkeypatch):
    import typing
    from typing import Optional

    from redi_ds.eval.__main__ import build_parser, options_from_args

    # only types the typed config tree coerces
    allowed = {int, float, str, bool, dict, Optional[int], Optional[float], Optional[str]}
    hints = typing.get_type_hints(EvalOptions)
    assert set(hints) == {f.name for f in dataclasses.fields(EvalOptions)}
    assert all(tp in allowed for tp in hints.values()), hints
    d = EvalOptions()
    assert (d.samples, d.temperature, d.top_p, d.max_new_tokens, d.limit, d.system_prompt, d.backend) == \
           (1, 0.6, 0.95, 4096, 0, PAPER_INSTRUCTION, "auto")
    assert d.backend_options == {} and d.backend_options is not EvalOptions().backend_options
    d.check()
    # the CLI's defaults are EvalOptions' (hf backend: no vllm options), and each option lands in its field
    assert options_from_args(build_parser().parse_args(["--model", "m", "--backend", "hf"])) == \
           EvalOptions(backend="hf")
    args = build_parser().parse_args(["--model", "m", "--samples", "3", "--top-p", "0.5", "--no-system-prompt",
                                      "--force-think", "--grade-timeout", "2.5", "--max-model-len", "64"])
    got = options_from_args(args)
    assert (got.samples, got.top_p, got.system_prompt, got.force_think, got.grade_timeout) == \
           (3, 0.5, None, True, 2.5)
    assert got.backend_options == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.85, "max_model_len": 64}
    # main hands run_eval one EvalOptions and the run context as keywords
    seen = {}

    def fake_run_eval(model, benchmarks, options=None, **context):
        seen.update(model=model, benchmarks=benchmarks, options=options, context=context)
        return {}

    monkeypatch.setattr(runner, "run_eval", fake_run_eval)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--model", "m", "--bench", "aime24", "--samples", "3", "--out", "o", "--no-progress"]) == 0
    assert seen["options"] == EvalOptions(samples=3, backend_options={
        "tensor_parallel_size": 1, "gpu_memory_utilization": 0.85, "max_model_len": None})
    assert seen["context"] == {"out_dir": "o", "mlflow_run_id": None, "tracking_uri": None,
                               "mlflow_experiment": "redi-ds-eval", "progress": False, "rank": 0, "world_size": 1}


@pytest.mark.parametrize("changes,fragment", [
    ({"samples": 0}, "samples must be >= 1, got 0"),
    ({"temperature": -0.1}, "need a finite temperature >= 0"),
    ({"temperature": float("nan")}, "need a finite temperature >= 0"),
    ({"temperature": float("inf")}, "need a finite temperature >= 0"),
    ({"batch_size": 0}, "batch_size must be >= 1 (or unset), got 0"),
    ({"top_p": 0.0}, "0 < top_p <= 1"),
    ({"top_p": 1.5}, "0 < top_p <= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens >= 1"),
    ({"limit": -1}, "limit >= 0"),
    ({"samples": "many"}, "samples must be an integer, got 'many'"),
    ({"temperature": None}, "temperature must be a number, got None"),
])
def test_eval_options_check_is_one_line(changes, fragment):
    with pytest.raises(EvalError, match=re.escape(fragment)) as err:
        EvalOptions(**changes).check()
    assert "\n" not in str(err.value)


def test_run_eval_checks_options_before_loading_anything(tmp_path):
    with pytest.raises(EvalError, match="samples must be >= 1"):
        run_eval(str(tmp_path / "no-model"), "aime24", EvalOptions(samples=0), out_dir=tmp_path / "o")
    with pytest.raises(EvalError, match="options must be an EvalOptions, got dict"):
        run_eval(str(tmp_path / "no-model"), "aime24", {"samples": 2}, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- errors


def test_cli_bad_model_path_is_one_line_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "redi_ds.eval", "--model", str(tmp_path / "nope"), "--bench", "aime24",
           "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model path not found") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,fragment", [
    (["--bench", "nosuchbench"], "unknown benchmark"),
    (["--bench", "BAD"], "malformed benchmark file"),
    (["--bench", "aime24", "--samples", "0"], "samples must be >= 1"),
])
def test_cli_errors_are_one_line_exit_2(tiny_model, tmp_path, capsys, argv, fragment):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "problem": "p", "answer": "1"}\n{not json}\n')
    argv = [str(bad) if a == "BAD" else a for a in argv]
    assert main(["--model", tiny_model, "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1


def test_cli_existing_folder_without_config_is_an_error(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["--model", str(tmp_path / "m"), "--bench", "aime24"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_unavailable_or_unknown_backend_is_an_error(tiny_model, tmp_path, capsys):
    from redi_ds.eval.backends import VLLMGenerator

    if VLLMGenerator.available():
        pytest.skip("vllm is usable here")
    assert main(["--model", tiny_model, "--bench", "aime24", "--backend", "vllm", "--out", str(tmp_path / "v")]) == 2
    assert "not available" in capsys.readouterr().err
    assert main(["--model", tiny_model, "--bench", "aime24", "--backend", "nope", "--out", str(tmp_path / "n")]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "n").exists()
