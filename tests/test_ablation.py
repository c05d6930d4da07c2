"""The ablation harness: its task, statistics and verdicts (fast), and a smoke-size run end to end (slow)."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from redi_ds.ablation import stats, task
from redi_ds.ablation.config import load_ablation
from redi_ds.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the task


def test_task_is_deterministic_disjoint_and_correct():
    cfg = task.TaskConfig(sft_problems=300, stage2_problems=100, val_problems=50, test_problems=80)
    a, b = task.generate(cfg), task.generate(cfg)
    assert a == b
    exprs = [r["problem"] for split in a.values() for r in split]
    assert len(exprs) == len(set(exprs)) == 530  # disjoint splits
    styles = {"steps": 0, "direct": 0}
    for r in a["sft"]:
        value = eval(r["problem"][:-2])  # "12+34-5=?" -> the expression
        assert r["answer"] == str(value) and r["response"].endswith(f"\\boxed{{{value}}}")
        styles[r["style"]] += 1
        if r["style"] == "steps":  # every line is right and carries on from the last
            for line in r["response"].splitlines()[:-1]:
                lhs, rhs = line.split("=")
                assert eval(lhs) == int(rhs)
        wrong = int(r["rejected"].split("{")[-1].rstrip("}"))
        assert wrong != value  # the teacher's mistake ends wrong
    assert 0.4 < styles["direct"] / 300 < 0.6  # direct_fraction 0.5


def test_shipped_tokenizer_equals_a_fresh_build(tmp_path):
    from transformers import AutoTokenizer

    task.build_tokenizer(tmp_path)
    shipped = ROOT / "redi_ds" / "assets" / "tokenizer" / "arith"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((shipped / name).read_text()) == json.loads((tmp_path / name).read_text()), name
    tok = AutoTokenizer.from_pretrained(str(shipped))
    text = "12+3=15\n15-4=11\n\\boxed{11}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one character, one token
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id and tok.unk_token_id not in ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+2=?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "Q:1+2=?\nA:"


# ----------------------------------------------------------------------------- statistics


def test_style_table_from_scored_samples(tmp_path):
    assert task.style_of("12+3=15\n15-5=10\n\\boxed{10}") == "steps"
    assert task.style_of("\\boxed{10}") == "direct" and task.style_of("\\boxed{1=2}") == "direct"
    rows = [("1+2=3\n\\boxed{3}", True), ("1+2=4\n\\boxed{4}", False), ("\\boxed{3}", False),
            ("1+1=2\n\\boxed{2}", True)]
    for where in ("base/sft", "runs/redi-0.8/lr0.0001/seed0/redi"):
        d = tmp_path / where / "scores" / "test"
        d.mkdir(parents=True)
        d.joinpath("samples.jsonl").write_text("".join(json.dumps({"response": r, "correct": c}) + "\n"
                                                       for r, c in rows))
    table = {r["model"]: r for r in task.styles(tmp_path)}
    assert set(table) == {"base", "redi-0.8 lr0.0001 seed0"}
    assert table["base"]["steps_share"] == 0.75 and table["base"]["steps_accuracy"] == pytest.approx(2 / 3)
    assert table["base"]["direct_accuracy"] == 0.0


def test_paired_statistics_hand_computed():
    base = [[1, 0, 0, 1]]
    a = [[1, 1, 0, 1], [1, 1, 1, 1]]  # seed 0: +1 problem, seed 1: +2 problems
    d = stats.paired(a, base)
    assert d.value == pytest.approx((0.25 + 0.5) / 2)
    assert [v for v, _ in d.per_seed] == [0.25, 0.5]
    # per-seed SE: sd of the differences (0,1,0,0) = 0.5 over sqrt(4); (0,1,1,0): sd 0.57735 / 2
    assert d.per_seed[0][1] == pytest.approx(0.25) and d.per_seed[1][1] == pytest.approx(math.sqrt(1 / 3) / 2)
    # combined: seed-averaged differences (0, 1, .5, 0) -> sd 0.4787 / 2; seeds 0.25, 0.5 -> sd 0.17678 / sqrt 2
    sd_avg = math.sqrt(sum((x - 0.375) ** 2 for x in (0, 1, 0.5, 0)) / 3)
    assert d.se == pytest.approx(math.sqrt(sd_avg ** 2 / 4 + (0.25 / math.sqrt(2)) ** 2 / 2))
    acc = stats.accuracy(a)
    assert acc.value == pytest.approx(0.875) and acc.per_seed[0] == (0.75, pytest.approx(math.sqrt(0.75 * 0.25 / 4)))


def test_verdicts_are_worded_from_the_numbers():
    big = stats.Paired(0.05, 0.01, [(0.05, 0.01)])
    verdict, text = stats.claim_beats("redi-0.8", "sft", big)
    assert verdict == "supported" and "+5.0 points (SE 1.0, 1 seed)" in text
    assert stats.claim_beats("redi-0.8", "sft", stats.Paired(-0.05, 0.01, [(0, 0)]))[0] == "contradicted"
    assert stats.claim_beats("redi-0.8", "sft", stats.Paired(0.01, 0.01, [(0, 0)]))[0] == "inconclusive"
    curves = {"redi-1.0": {"chosen": [(0, -1.0), (50, -1.6)], "rejected": [(0, -1.2), (50, -3.0)]},
              "redi-0.8": {"chosen": [(0, -1.0), (50, -0.95)], "rejected": [(0, -1.2), (50, -1.9)]}}
    verdict, text = stats.claim_stability({"0.001": curves})
    assert verdict == "supported" and "LR 0.001: 0.600 vs -0.050 (rejected 1.800 vs 0.700)" in text
    low = {"redi-1.0": {"chosen": [(0, -1.0), (50, -1.3)], "rejected": [(0, -1.2), (50, -2.0)]},
           "redi-0.8": {"chosen": [(0, -1.0), (50, -1.2)], "rejected": [(0, -1.2), (50, -1.8)]}}
    verdict, text = stats.claim_stability({"0.001": low, "0.0001": curves})  # one LR shows it: enough
    assert verdict == "supported" and text.index("LR 0.001: 0.300 vs 0.200") < text.index("LR 0.0001")
    assert stats.claim_stability({"0.001": low})[0] == "partly"  # 1.0 falls further, but 0.8 falls too
    assert stats.claim_stability({"0.001": {"redi-1.0": low["redi-0.8"], "redi-0.8": low["redi-1.0"]}}
                                 )[0] == "not shown"
    curves["redi-1.0"]["chosen"][-1] = (50, -1.02)
    assert stats.claim_stability({"0.001": curves})[0] == "not shown"
    # different LRs are never compared: redi-1.0 only at one LR, redi-0.8 only at another
    assert stats.claim_stability({"0.001": {"redi-1.0": low["redi-1.0"]},
                                  "0.0001": {"redi-0.8": low["redi-0.8"]}})[0] == "not tested"
    deltas = {"dpo": stats.Paired(-0.1, 0.01, []), "simpo": stats.Paired(0.0, 0.01, [])}
    verdict, text = stats.claim_baselines(deltas, {"redi-0.8": 1e-3, "dpo": 1e-3, "simpo": 1e-4})
    assert verdict == "supported" and "dpo -10.0 points" in text and "simpo" in text
    assert stats.claim_baselines({"dpo": stats.Paired(0.0, 0.01, [])}, {})[0] == "not shown"


def test_ablation_config_errors_are_one_line(tmp_path):
    cfg = load_ablation("ablation-tiny", "quick")
    assert cfg.seeds == 1 and not cfg.sweep and cfg.task.sft_problems == 8000
    assert all(len(b.lrs) == 1 for b in cfg.branches.values()) and cfg.branch("redi-0.8").overrides == {"loss.alpha": 0.8}
    assert {"sft", "redi-0.8", "redi-1.0", "dpo", "simpo"} <= set(cfg.branches)
    smoke = load_ablation("ablation-tiny", "smoke")
    assert smoke.task.sft_problems == 300 and smoke.stage2["train.max_steps"] == 4
    assert smoke.stage2["train.schedule"] == "linear"  # merged over, not replaced
    paper = load_ablation("ablation-paper")  # the cluster-scale config is checked here, run elsewhere
    assert paper.task is None and paper.data.test == "math500" and paper.recipe == "paper"
    bad = tmp_path / "bad.yaml"
    bad.write_text("ablation:\n  seeds: 2\n  branches: {x: {stage: redi, data: nope, lrs: [1.0e-3]}}\n"
                   "  reference: x\n")
    with pytest.raises(ConfigError, match=r"branches.x.data = 'nope'") as e:
        load_ablation(str(bad))
    assert "\n" not in str(e.value)
    bad.write_text("ablation:\n  seedz: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'seedz'"):
        load_ablation(str(bad))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "out"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "redi_ds.ablation", "--config", "ablation-tiny", "--smoke", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, r, cmd, env


@pytest.mark.slow
def test_smoke_ablation_writes_its_report(smoke_run):
    out, r, _, _ = smoke_run
    res = json.loads((out / "results.json").read_text())
    assert set(res["branches"]) == {"sft", "redi-0.8", "redi-1.0", "dpo", "simpo", "redi-0.8-teacher"}
    for name, b in res["branches"].items():
        assert {"accuracy", "se", "delta", "delta_se", "seeds", "lr"} <= set(b), name
        assert [s["seed"] for s in b["seeds"]] == [0] and Path(b["seeds"][0]["export"]).is_dir()
        assert 0 <= b["accuracy"] <= 1 and b["curves"]["chosen"][0][0] == 0  # probed before the first step
    assert Path(res["heldout"]).is_file() and "{export}" in res["reproduce"]
    assert set(res["claims"]) >= {"1", "2", "3", "3/dpo", "3/simpo"}
    summary = (out / "summary.md").read_text()
    assert "| base (SFT) |" in summary and "**Claim 1**" in summary and res["claims"]["1"]["text"] in summary
    for plot in ("accuracy.png", "logprobs.png", "stability.png"):  # stability: both alphas at lrs[0]
        assert (out / plot).stat().st_size > 0, plot
    assert "claim 1:" in r.stdout


@pytest.mark.slow
def test_the_recorded_command_rescores_an_export_to_the_tables_number(smoke_run, tmp_path):
    out, _, _, env = smoke_run
    res = json.loads((out / "results.json").read_text())
    seed = res["branches"]["redi-0.8"]["seeds"][0]
    cmd = shlex.split(res["reproduce"].replace("{export}", shlex.quote(seed["export"])))
    r = subprocess.run([sys.executable, *cmd[1:], "--out", str(tmp_path / "rescore"), "--no-progress"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "rescore" / "summary.json").read_text())
    assert next(iter(summary["benchmarks"].values()))["pass@1"] == pytest.approx(seed["accuracy"], abs=1e-12)


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(smoke_run):
    from mlflow.tracking import MlflowClient

    out, _, _, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    parent_id = (out / "mlflow_parent_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "ablation-tiny/smoke" and parent.data.tags["kind"] == "ablation"
    assert "redi-0.8/accuracy" in parent.data.metrics
    exp = client.get_experiment_by_name("ablation-tiny-smoke")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_branch = {(c.data.tags["branch"], c.data.tags["seed"]) for c in children}
    assert ("base", "-") in by_branch and ("redi-0.8", "0") in by_branch and len(children) == 7
    redi = next(c for c in children if c.data.tags["branch"] == "redi-0.8")
    assert redi.info.run_name.endswith("/redi") and redi.data.tags["alpha"] == "0.8"
    assert any(k.startswith("eval/test") for k in redi.data.metrics) and "heldout_logp_chosen" in redi.data.metrics


@pytest.mark.slow
def test_a_rerun_reuses_every_finished_run(smoke_run):
    out, _, cmd, env = smoke_run
    before = json.loads((out / "results.json").read_text())
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("is already done") == 7
    after = json.loads((out / "results.json").read_text())
    assert {k: v["accuracy"] for k, v in after["branches"].items()} == \
        {k: v["accuracy"] for k, v in before["branches"].items()}


@pytest.mark.slow
def test_student_negatives_cli(smoke_run, tmp_path):
    """python -m redi_ds.data.negatives on the smoke base: every problem and sample counted, every rejected
    response graded wrong, chosen responses from the data, a bad row counted, not lost."""
    from redi_ds.eval import grade

    out, _, _, env = smoke_run
    data = tmp_path / "problems.jsonl"
    rows = [json.loads(x) for x in (out / "data" / "stage2.jsonl").read_text().splitlines()][:40]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"problem": "1+1=?"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "redi_ds.data.negatives", "--model", str(out / "base" / "sft" / "export"),
                        "--data", str(data), "--samples", "3", "--temperature", "1.0", "--max-new-tokens", "48",
                        "--no-system-prompt", "--backend", "hf", "--out", str(tmp_path / "neg"), "--no-progress"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads((tmp_path / "neg" / "stats.json").read_text())
    assert st["problems"] == 40 and st["samples"] == 120 and st["correct"] + st["incorrect"] == 120
    assert st["with_negative"] + st["all_correct"] + st["only_empty"] == 40
    assert st["skipped"] == {"missing_response": 1}
    import datasets

    pairs = datasets.load_from_disk(str(tmp_path / "neg" / "pairs"))
    assert len(pairs) == st["with_negative"] > 0
    by_prompt = {r["problem"]: r for r in rows}
    for p in pairs:
        assert p["chosen"] == by_prompt[p["prompt"]]["response"] and not grade(p["rejected"], p["answer"])
    sft = datasets.load_from_disk(str(tmp_path / "neg" / "sft"))
    assert sorted(sft["problem"]) == sorted(pairs["prompt"])
