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


def test_task_traces_are_valid_orders_of_similar_length():
    cfg = task.TaskConfig(teacher_problems=200, sft_problems=100, stage2_problems=50, val_problems=30,
                          test_problems=40)
    a, b = task.generate(cfg), task.generate(cfg)
    assert a == b
    exprs = [r["problem"] for split in a.values() for r in split]
    assert len(exprs) == len(set(exprs)) == 420  # disjoint splits
    lengths = []
    for r in a["teacher"]:
        value = eval(r["problem"][:-2])  # "12+7-5=?" -> the expression
        assert r["answer"] == str(value) and r["response"].endswith(f"\\boxed{{{value}}}")
        lines = r["response"].splitlines()[:-1]
        assert len(lines) == r["level"] - 1 and r["orders"] >= 2
        v = None
        for line in lines:  # every line is right, carries on from the last, and stays in range
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= cfg.max_value
            assert v is None or lhs.startswith(str(v))
            v = int(rhs)
        terms = sorted(t for t in __import__("re").findall(r"[+-]?\d+", "+" + r["problem"][:-2]))
        used = sorted(["+" + lines[0].split("=")[0].split("+")[0].split("-")[0]]
                      + [m for line in lines for m in __import__("re").findall(r"[+-]\d+", line.split("=")[0][1:])])
        assert sorted(t if t[0] in "+-" else "+" + t for t in terms) == used  # the same terms, reordered
        lengths.append(len(r["response"]))
    # every valid order of a problem has the same number of lines: lengths differ by a few digits at most
    # (each intermediate value is written twice, one or two digits)
    terms = [("+", 7), ("-", 5), ("+", 9), ("-", 2)]
    all_orders = task.orders(terms, 30)
    assert len(all_orders) >= 2 and {len(task.trace(o).splitlines()) for o in all_orders} == {4}
    assert max(len(task.trace(o)) for o in all_orders) - min(len(task.trace(o)) for o in all_orders) <= 6  # digits
    assert all(o[0][0] == "+" for o in all_orders)
    assert task.is_in_order("7-5+9-2=?", "7-5=2\n2+9=11\n11-2=9\n\\boxed{9}")
    assert not task.is_in_order("7-5+9-2=?", "7+9=16\n16-5=11\n11-2=9\n\\boxed{9}")


def test_teacher_and_student_data_from_graded_samples(tmp_path):
    from redi_ds.ablation import traces

    rows = {"sft": [{"problem": "1+2+3=?", "answer": "6"}, {"problem": "2+2+1=?", "answer": "5"}],
            "stage2": [{"problem": "3+1+1=?", "answer": "5"}, {"problem": "4-1+1=?", "answer": "4"}],
            "val": [{"problem": "5-1+2=?", "answer": "6"}]}
    samples = {"sft": [[("x", False, "stop"), ("1+2=3\n3+3=6", True, "stop"), ("1+2=3\n3+3=6", True, "stop"),
                        ("2+3=5\n5+1=6", True, "stop")], [("", False, "stop")]],
               "stage2": [[("3+1=4\n4+1=5", True, "stop"), ("", False, "stop"), ("3+1=4\n4+1=6", False, "stop")],
                          [("4-1=3\n3+1=4", True, "length")]],
               "val": [[("5-1=4\n4+2=6", True, "stop"), ("5+2=7\n7-1=5", False, "stop")]]}
    st = traces.teacher_data(rows, samples, tmp_path)
    read = lambda n: [json.loads(x) for x in (tmp_path / n).read_text().splitlines()]  # noqa: E731
    assert read("sft.jsonl") == [{"problem": "1+2+3=?", "response": "1+2=3\n3+3=6", "answer": "6"},
                                 {"problem": "1+2+3=?", "response": "2+3=5\n5+1=6", "answer": "6"}]  # distinct
    assert read("teacher_pairs.jsonl") == [{"prompt": "3+1+1=?", "chosen": "3+1=4\n4+1=5",
                                            "rejected": "3+1=4\n4+1=6", "answer": "5"}]  # the empty one is skipped
    assert [r["problem"] for r in read("stage2.jsonl")] == ["3+1+1=?"]
    assert read("probe_pairs.jsonl")[0]["kind"] == "different first step"
    assert st["sft"]["kept"] == 2 and st["sft"]["all_wrong"] == 1 and st["stage2"]["empty_wrong"] == 1
    assert st["stage2"]["truncated"] == 1 and st["stage2"]["correct"] == 2 and st["stage2"]["pairs"] == 1
    pairs = read("teacher_pairs.jsonl") + [{"prompt": "9=?", "chosen": "c", "rejected": "r", "answer": "9"}]
    student = [[("s-right", True, "stop"), ("s-wrong", False, "stop"), ("s-right", True, "stop")],
               [("3+1=4\n4+1=5", True, "stop")]]
    st = traces.student_data(pairs[:1] + pairs[1:], [student[0], [("c", True, "stop")]], tmp_path / "s")
    assert read("s/student_pairs.jsonl") == [{"prompt": "3+1+1=?", "chosen": "3+1=4\n4+1=5", "rejected": "s-wrong",
                                              "answer": "5"}]
    assert [r["response"] for r in read("s/rft.jsonl")] == ["3+1=4\n4+1=5", "s-right", "c"]  # no duplicates
    assert st["student_pairs"] == 1 and st["rft_rows"] == 3


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


def test_t_quantiles_match_tables():
    for df, q975, q95 in ((1, 12.7062, 6.3138), (2, 4.3027, 2.9200), (5, 2.5706, 2.0150), (30, 2.0423, 1.6973),
                          (math.inf, 1.9600, 1.6449)):
        assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
        assert stats.t_quantile(0.95, df) == pytest.approx(q95, abs=1e-4)
    assert stats.t_cdf(-2.0, 4) == pytest.approx(0.0580583, abs=1e-7)


def test_hierarchical_estimate_hand_computed():
    # 2 bases x 2 seeds x 4 problems of differences
    d = [[[1, 0, 0, 0], [1, 1, 0, 0]], [[0, 0, 0, 0], [1, 0, 0, 1]]]
    e = stats.estimate(d)
    assert e.per_seed == [[0.25, 0.5], [0.0, 0.5]] and e.per_base == [0.375, 0.25]
    assert e.value == pytest.approx(0.3125)
    by_problem = [0.75, 0.25, 0.0, 0.25]
    v1 = stats.sd(by_problem) ** 2 / 4
    v2 = (0.375 - 0.25) ** 2 / 2 / 2  # sd of two base means = |a - b| / sqrt 2; squared over B = 2
    assert e.se == pytest.approx(math.sqrt(v1 + v2))
    assert e.df == pytest.approx((v1 + v2) ** 2 / (v1 ** 2 / 3 + v2 ** 2 / 1))
    one = stats.estimate([[[1, 0], [0, 0], [1, 1]]])  # one base: the seeds carry the training noise
    assert one.se == pytest.approx(math.sqrt(stats.sd([2 / 3, 1 / 3]) ** 2 / 2 + stats.sd([0.5, 0, 1]) ** 2 / 3))
    base = [[[1, 0, 0, 1]], [[0, 0, 1, 1]]]
    a = [[[1, 1, 0, 1], [1, 1, 1, 1]], [[0, 1, 1, 1], [1, 1, 1, 1]]]
    p = stats.paired(a, base)  # each base's runs against that base
    assert p.per_seed == [[0.25, 0.5], [0.25, 0.5]]


def _est(value, se, df=1e9):
    return stats.Estimate(value, se, df, [value, value], [[value], [value]])


def test_verdict_rules_on_a_synthetic_table():
    rules = stats.Rules(alpha=0.05, margin=0.02)
    assert _est(0.05, 0.01).verdict(rules) == "supported"
    assert _est(-0.05, 0.01).verdict(rules) == "contradicted"
    assert _est(0.003, 0.005).verdict(rules) == "tie"  # 90% interval [-0.5, +1.1] points inside +-2
    assert _est(0.01, 0.02).verdict(rules) == "inconclusive"
    assert _est(0.05, 0.01, df=1).verdict(rules) == "inconclusive"  # t(0.975, 1) = 12.7: not enough bases
    assert _est(0.015, 0.001).verdict(rules) == "tie"  # significant but inside the margin: a tie by the rules
    assert stats.combine(["supported", "supported"]) == "supported"
    assert stats.combine(["supported", "contradicted"]) == "contradicted"
    assert stats.combine(["tie", "tie"]) == "tie" and stats.combine(["tie", "supported"]) == "inconclusive"
    assert "+5.0 points, 95% interval [+3.0, +7.0]" in _est(0.05, 0.01).words(rules)
    # one base, one seed: 1000 problems and a 10-point gain, but the training noise is unknown, so no verdict
    one = stats.estimate([[[0.1] * 900 + [0.0] * 100]])
    assert one.one_run and one.se > 0 and one.verdict(rules) == "inconclusive" and "no verdict" in one.words(rules)
    two = stats.estimate([[[0.1] * 900 + [0.0] * 100], [[0.1] * 900 + [0.0] * 100]])  # two bases that agree
    assert not two.one_run and two.verdict(rules) == "supported"


def test_claims_from_a_synthetic_results_table():
    """The report's claim rows from per-problem scores built to give each verdict."""
    from types import SimpleNamespace

    from redi_ds.ablation import report

    rules = stats.Rules(alpha=0.05, margin=0.02)
    n = 400

    def runs(p: float, shift: int = 0):  # 2 bases x 3 seeds; problem i correct when (i + shift) % 100 < 100 p
        return [[[float((i + shift + s) % 100 < 100 * p) for i in range(n)] for s in range(3)] for _ in range(2)]

    mats = {m: {"redi-0.8": runs(0.60), "sft": runs(0.40), "dpo": runs(0.80), "simpo": runs(0.60, 1),
                "redi-0": runs(0.60)} for m in ("greedy", "sampled")}
    claim = lambda a, b: SimpleNamespace(text="t", source="s", kind="beats", section="paper", a=a, b=b)  # noqa: E731
    assert report.claim(claim("redi-0.8", ["sft"]), mats, {}, rules, "sampled")["verdict"] == "supported"
    assert report.claim(claim("redi-0.8", ["dpo"]), mats, {}, rules, "sampled")["verdict"] == "contradicted"
    assert report.claim(claim("redi-0.8", ["redi-0"]), mats, {}, rules, "sampled")["verdict"] == "tie"
    row = report.claim(claim("redi-0.8", ["sft", "simpo"]), mats, {}, rules, "sampled")
    assert row["sampled"]["against"]["sft"]["verdict"] == "supported" and row["verdict"] == "inconclusive"
    assert row["sampled"]["against"]["simpo"]["verdict"] == "tie"


def test_stability_rule_per_probe_kind():
    rules = stats.Rules(collapse_nats=0.1)
    fall = lambda c0, c1, r0, r1: {"chosen": [(0, c0), (50, c1)], "rejected": [(0, r0), (50, r1)]}  # noqa: E731
    hit = {"redi-1.0": {"same": fall(-1, -1.6, -1.2, -3), "diff": fall(-1, -1.5, -1, -2)},
           "redi-0.8": {"same": fall(-1, -0.95, -1.2, -1.9), "diff": fall(-1, -1.05, -1, -1.5)}}
    verdict, text = stats.stability({"0.001": hit}, rules)
    assert verdict == "supported" and "LR 0.001, same: 0.600 vs -0.050 (rejected 1.800 vs 0.700)" in text
    half = {"redi-1.0": hit["redi-1.0"], "redi-0.8": {**hit["redi-0.8"], "diff": fall(-1, -1.3, -1, -1.5)}}
    assert stats.stability({"0.001": half}, rules)[0] == "not shown"  # one kind only: not enough
    assert stats.stability({"0.001": half, "0.0003": hit}, rules)[0] == "supported"  # some LR in every kind
    assert stats.stability({"0.001": {"redi-1.0": hit["redi-1.0"]}}, rules)[0] == "not tested"


def test_heldout_probe_reports_each_kind_of_pair(tmp_path, monkeypatch):
    """The claim-2 probe split by trace type: a JSONL's ``kind`` column gives per-kind means next to the overall."""
    import torch
    from types import SimpleNamespace

    from redi_ds import passes

    path = tmp_path / "probe.jsonl"
    kinds = ["a", "b", "a"]
    path.write_text("".join(json.dumps({"prompt": "1+1=?", "chosen": "c", "rejected": "r", "kind": k}) + "\n"
                            for k in kinds))
    skipped = SimpleNamespace(line=lambda: "3/3 kept")
    encode = lambda raw, layout: ([{}] * len(raw), skipped)  # noqa: E731
    batcher = SimpleNamespace(with_layout=lambda layout: None)
    monkeypatch.setattr(passes, "logprob_pass", lambda *a: (torch.tensor([-1.0, -4, -9, -2, -2, -6], dtype=torch.float64),
                                                            torch.tensor([1.0, 1, 3, 1, 2, 2], dtype=torch.float64)))
    probe = passes.HeldoutProbe(str(path), 10, encode, batcher, 4)
    row = probe.measure(None, 5)
    assert row["logp_chosen"] == pytest.approx(-8 / 3) and row["logp_rejected"] == pytest.approx(-2)
    assert row["logp_chosen/a"] == pytest.approx(-2) and row["logp_chosen/b"] == pytest.approx(-4)
    assert row["logp_rejected/a"] == pytest.approx(-2.5) and row["logp_rejected/b"] == pytest.approx(-1)
    path.write_text(path.read_text() + json.dumps({"prompt": "2=?", "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(ConfigError, match="a 'kind' column needs a string kind on every row"):
        passes.HeldoutProbe(str(path), 10, encode, batcher, 4)


def test_ablation_config_errors_are_one_line(tmp_path):
    cfg = load_ablation("ablation-tiny")
    assert cfg.bases >= 2 and cfg.seeds >= 3 and cfg.sweep_seed not in range(cfg.seeds)
    assert {"sft", "sft-2x", "redi-0", "redi-0.8", "redi-1.0", "redi-0.8-divergent", "dpo", "simpo"} <= set(cfg.branches)
    assert [g["loss.beta"] for g in cfg.branch("dpo").grid] == [0.01, 0.1] and len(cfg.branch("simpo").grid) >= 2
    assert cfg.claims["1"].a == "redi-0.8" and cfg.branch("redi-0.8").data == "teacher"  # claim 1: the teacher's pairs
    smoke = load_ablation("ablation-tiny", "smoke")  # the student section: in the smoke size (and the paper config)
    assert smoke.claims["S"].section == "student" and smoke.branch("rft").section == "student"
    quick = load_ablation("ablation-tiny", "quick")
    assert quick.bases == 1 and all(len(b.lrs) <= 1 for b in quick.branches.values())
    assert smoke.task.sft_problems == 80 and smoke.stage2["train.schedule"] == "linear"  # merged over, not replaced
    paper = load_ablation("ablation-paper")  # the cluster-scale config is checked here, run elsewhere
    assert paper.task is None and paper.data.test == "math500" and set(paper.branches) == set(smoke.branches)
    assert {k: c.text for k, c in paper.claims.items()} == {k: c.text for k, c in smoke.claims.items()}
    bad = tmp_path / "bad.yaml"
    cases = {"branches: {x: {stage: redi, data: nope, lrs: [1.0e-3]}}": r"branches.x.data = 'nope'",
             "sweep_seed: 1\n  branches: {x: {lrs: [1.0e-3]}}": r"sweep_seed = 1 is a test seed",
             "branches: {x: {lr_from: y}}": r"branches.x.lr_from = 'y'",
             "rules: {metric: best}\n  branches: {x: {lrs: [1.0e-3]}}": r"rules.metric = 'best'",
             "branches: {x: {lrs: [1.0e-3]}}\n  claims: {'1': {text: t, a: x, b: [z]}}": r"claims.1: .*unknown: z",
             "seedz: 2": r"unknown key 'seedz'"}
    for body, message in cases.items():
        bad.write_text(f"ablation:\n  seeds: 2\n  {body}\n")
        with pytest.raises(ConfigError, match=message) as e:
            load_ablation(str(bad))
        assert "\n" not in str(e.value)


def test_phase_timings_survive_an_invocation_that_stops(tmp_path):
    from redi_ds.ablation.harness import Ablation

    ab = Ablation(load_ablation("ablation-tiny", "smoke"), tmp_path, "ablation-tiny", "smoke", "cmd")
    tmp_path.mkdir(exist_ok=True)
    assert ab._timed("data", lambda: 7) == 7

    def stops():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ab._timed("bases", stops)  # a stopped phase still counts
    again = Ablation(load_ablation("ablation-tiny", "smoke"), tmp_path, "ablation-tiny", "smoke", "cmd")
    again._timed("bases", lambda: None)  # a resumed invocation adds to what is on disk
    assert set(again._cumulative_timings()) == {"data", "bases"}
    assert json.loads((tmp_path / "timings.json").read_text())["bases"] >= 0


def test_teacher_is_the_first_part_that_reaches_its_target(tmp_path, monkeypatch):
    """The teacher's strength rule: trained in parts, it stops after the first part whose validation accuracy
    reaches the target; a rerun retrains no finished part and stops at the same one."""
    from types import SimpleNamespace

    from redi_ds.ablation import harness

    ab = harness.Ablation(load_ablation("ablation-tiny", "smoke"), tmp_path, "ablation-tiny", "smoke", "cmd")
    trained, curve_by_epochs = [], {3: 0.42, 6: 0.81, 9: 0.97, 12: 0.99}

    def fake_train(stage, out, settings, tags):
        trained.append(settings.get("train.epochs", 12))
        return SimpleNamespace(export=str(out / "sft" / "export"))

    def fake_score(rec, split, bench, metric="greedy", where="", root=None):
        part = Path(root, where)
        part.mkdir(parents=True, exist_ok=True)
        (part / "summary.json").write_text("{}")
        epochs = trained[-1] if trained else {1: 3, 2: 6, 3: 9, 4: 12}[int(where[-1])]
        return harness.Score(curve_by_epochs[epochs], {}, str(part))

    monkeypatch.setattr(ab, "_train", fake_train)
    monkeypatch.setattr(ab, "score", fake_score)
    settings = {"train.epochs": 12}
    export, curve = ab._train_in_parts("teacher", tmp_path / "teacher", settings, 4, "val.jsonl", target=0.8)
    assert curve == [(3, 0.42), (6, 0.81)] and trained == [3, 6] and export.endswith("teacher/sft/export")
    trained.clear()
    assert ab._train_in_parts("teacher", tmp_path / "teacher", settings, 4, "val.jsonl", target=0.8)[1] == curve
    assert trained == []  # both parts were finished: nothing retrained
    _, full = ab._train_in_parts("base0", tmp_path / "base0", settings, 4, "val.jsonl")  # no target: every part
    assert [e for e, _ in full] == [3, 6, 9, 12] and trained == [3, 6, 9, 12]


def test_preregistration_names_the_commit_of_the_config(tmp_path):
    from redi_ds.ablation import report

    pre = report.preregistration("ablation-tiny")
    assert pre["file"].endswith("ablation-tiny.yaml") and len(pre["sha256"]) == 64
    own = tmp_path / "prereg-own.yaml"  # a user's YAML path: hashed, and not in git here
    own.write_text("ablation: {}\n")
    mine = report.preregistration(str(own))
    assert mine["file"] == str(own) and mine["commit"] == "unknown" and not mine["clean"]
    import hashlib

    assert mine["sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
    if (ROOT / ".git").exists():  # a checkout: the commit that last changed the file
        import subprocess

        last = subprocess.run(["git", "log", "-1", "--format=%H", "--", "redi_ds/configs/ablation-tiny.yaml"],
                              cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert pre["commit"] == (last or "unknown")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "out"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "redi_ds.ablation", "--config", "ablation-tiny", "--smoke", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, r, cmd, env


BRANCHES = {"sft", "sft-2x", "redi-0", "redi-0.8", "redi-1.0", "redi-0.8-divergent", "dpo", "simpo",
            "redi-0.8-student", "rft"}


@pytest.mark.slow
def test_smoke_ablation_writes_its_report(smoke_run):
    out, r, _, _ = smoke_run
    res = json.loads((out / "results.json").read_text())
    assert set(res["branches"]) == BRANCHES
    for name, b in res["branches"].items():
        assert [(x["base"], x["seed"]) for x in b["runs"]] == [(0, 0)] and Path(b["runs"][0]["export"]).is_dir()
        for metric in ("greedy", "sampled"):
            assert 0 <= b[metric]["accuracy"]["value"] <= 1 and "se" in b[metric]["vs_base"], name
        assert b["curves"]["all"]["chosen"][0][0] == 0  # probed before the first step
        assert set(b["curves"]) == {"all", "different first step", "same first step"}  # the probe by kind
    assert res["branches"]["sft-2x"]["lr"] == res["branches"]["sft"]["lr"]  # lr_from
    assert [k for k in res["branches"]["dpo"]["sweep"]] == ["3e-05|0", "3e-05|1"]  # the beta grid on validation
    assert res["branches"]["dpo"]["variant"] in ({"loss.beta": 0.01}, {"loss.beta": 0.1})
    # the teacher's data: graded samples, every problem accounted for
    t = res["teacher"]
    assert t["stage2"]["problems"] == 80 and t["stage2"]["samples"] == 640 and t["sft"]["kept"] > 0
    pairs = [json.loads(x) for x in (out / "data" / "teacher_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == t["stage2"]["pairs"] > 0
    from redi_ds.eval import grade

    for p in pairs:  # a right and a wrong teacher sample of the same problem, by the grader (outcome only)
        assert grade(p["chosen"], p["answer"]) and not grade(p["rejected"], p["answer"])
    assert res["base_probe"] == {} and len(res["bases"][0]["curve"]) == 2
    assert set(res["claims"]) == {"1", "1-negative-term", "2", "3", "S"}
    assert res["claims"]["1"]["verdict"] in stats.VERDICTS and res["claims"]["S"]["section"] == "student"
    pre = res["preregistration"]
    assert pre["file"].endswith("ablation-tiny.yaml") and len(pre["sha256"]) == 64 and "--smoke" in res["command"]
    summary = (out / "summary.md").read_text()
    assert "| base (SFT) |" in summary and "**Claim 1**" in summary and "not the paper's claim" in summary
    assert f"commit `{pre['commit']}`" in summary
    for plot in ("accuracy.png", "stability.png"):  # stability: both alphas at the smoke's two LRs
        assert (out / plot).stat().st_size > 0, plot
    assert "claim 1:" in r.stdout


@pytest.mark.slow
def test_the_recorded_commands_rescore_an_export_to_the_tables_numbers(smoke_run, tmp_path):
    out, _, _, env = smoke_run
    res = json.loads((out / "results.json").read_text())
    run = res["branches"]["redi-0.8"]["runs"][0]
    for metric in ("greedy", "sampled"):
        cmd = shlex.split(res["reproduce"][metric].replace("{export}", shlex.quote(run["export"])))
        r = subprocess.run([sys.executable, *cmd[1:], "--out", str(tmp_path / metric), "--no-progress"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((tmp_path / metric / "summary.json").read_text())
        assert next(iter(summary["benchmarks"].values()))["pass@1"] == pytest.approx(run[metric], abs=1e-12)


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(smoke_run):
    from mlflow.tracking import MlflowClient

    out, r, _, _ = smoke_run
    assert "warning: MLflow" not in r.stderr  # no tracking warning: the base's parts reopen their run
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    parent_id = (out / "mlflow_parent_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "ablation-tiny/smoke" and parent.data.tags["kind"] == "ablation"
    assert "redi-0.8/sampled" in parent.data.metrics
    exp = client.get_experiment_by_name("ablation-tiny-smoke")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_branch = {(c.data.tags["branch"], c.data.tags["seed"]) for c in children}
    assert {("teacher", "-"), ("base0", "-"), ("redi-0.8", "0"), ("redi-0.8", "100")} <= by_branch
    assert len(children) == 2 + len(BRANCHES) + 8  # teacher, base, test runs, sweep runs (sft, redi x2: 2 LRs; dpo: 2 betas)
    redi = next(c for c in children if c.data.tags["branch"] == "redi-0.8" and c.data.tags["seed"] == "0")
    assert redi.info.run_name.endswith("/redi") and redi.data.tags["alpha"] == "0.8"
    assert any(k.startswith("eval/test") for k in redi.data.metrics) and "heldout_logp_chosen" in redi.data.metrics


@pytest.mark.slow
def test_a_rerun_reuses_every_finished_run(smoke_run):
    out, _, cmd, env = smoke_run
    before = json.loads((out / "results.json").read_text())
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("is already done") == 2 + len(BRANCHES) + 8
    after = json.loads((out / "results.json").read_text())
    assert {k: v["runs"] for k, v in after["branches"].items()} == {k: v["runs"] for k, v in before["branches"].items()}


@pytest.mark.slow
def test_student_negatives_cli(smoke_run, tmp_path):
    """python -m redi_ds.data.negatives on the smoke base: every problem and sample counted, every rejected
    response graded wrong, chosen responses from the data, a bad row counted, not lost."""
    from redi_ds.eval import grade

    out, _, _, env = smoke_run
    data = tmp_path / "problems.jsonl"
    rows = [json.loads(x) for x in (out / "data" / "stage2.jsonl").read_text().splitlines()][:40]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"problem": "1+1=?"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "redi_ds.data.negatives", "--model", str(out / "base0" / "sft" / "export"),
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
