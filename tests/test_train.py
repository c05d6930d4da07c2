"""End-to-end training on DeepSpeed ZeRO-3, 2 CPU processes (gloo). Slow: minutes."""

from __future__ import annotations

import json

import pytest
import torch

import subprocess
import sys

from trainutil import FAST, ROOT, env_for, free_port, losses, run_configs, torchrun

pytestmark = pytest.mark.slow

STEPS = ["--train.max_steps", "6", "--train.save_every", "3"]  # the shared sft_run fixture (conftest.py)


def _policy_loss(hf_model, data_rows=4):
    """SFT loss of a model on the first rows of the tiny data, via the unfused reference head (the arith
    tokenizer and template, no system prompt: what FAST trains with)."""
    from redi_ds.config import ModelConfig
    from redi_ds.losses import loss_config
    from redi_ds.data.collate import collate
    from redi_ds.data.layout import SFT_ROWS
    from redi_ds.data.sources import load_source
    from redi_ds.data.tokenize import ChatEncoder, encode_dataset
    from redi_ds.kernels import FusedHeadOptions
    from redi_ds.losses import build_loss
    from redi_ds.model import PolicyModel, load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer="arith"), "tiny")
    raw = load_source("synthetic", SFT_ROWS, synthetic_size=data_rows, seed=42)
    data, _ = encode_dataset(raw, SFT_ROWS, ChatEncoder(tok, None), 256, 512)
    model = PolicyModel(hf_model, build_loss(loss_config("sft")), FusedHeadOptions(impl="reference")).eval()
    batch = collate([data[i] for i in range(len(data))], SFT_ROWS, tok.pad_token_id)
    with torch.no_grad():
        _, sums, counts = model.sequence_logprobs(batch)
    return (-sums.sum() / counts.sum()).item()


def test_zero3_loss_falls_and_every_parameter_changes(sft_run):
    import transformers

    from redi_ds.config import load_config
    from redi_ds.model import build_model

    out, r = sft_run
    stage = out / "sft"
    ls = losses(stage)
    assert len(ls) == 6 and ls[-1] < ls[0] - 0.5, ls
    assert "6/6" in r.stderr or "6/6" in r.stdout  # rank-0 progress bar
    cfg = load_config("tiny", stage="sft", overrides=FAST[2:])  # the run's own model config (FAST[:2]: --config)
    init = build_model(cfg.model, "tiny", torch.float32, seed=cfg.run.seed).state_dict()
    trained = transformers.AutoModelForCausalLM.from_pretrained(stage / "export").state_dict()
    assert {k: v.shape for k, v in init.items()} == {k: v.shape for k, v in trained.items()}
    unchanged = [k for k in init if torch.equal(init[k], trained[k])]
    assert unchanged == [], unchanged
    saved = (stage / "checkpoints" / "step_6" / "config.yaml").read_text()
    assert "global_batch_size: 8" in saved and (stage / "checkpoints" / "latest").read_text() == "step_6"


def test_export_reloads_with_the_checkpoint_loss(sft_run):
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out, _ = sft_run
    stage = out / "sft"
    exported = transformers.AutoModelForCausalLM.from_pretrained(stage / "export")
    tok = transformers.AutoTokenizer.from_pretrained(stage / "export")
    trained_with = (ROOT / "redi_ds" / "assets" / "tokenizer" / "arith" / "chat_template.jinja").read_text()
    assert tok.chat_template == trained_with  # the template the run trained with ships with the export
    sd = get_fp32_state_dict_from_zero_checkpoint(str(stage / "checkpoints"), tag="step_6")
    ckpt = transformers.AutoModelForCausalLM.from_config(exported.config)
    ckpt.load_state_dict({k[len("hf."):]: v for k, v in sd.items()}, strict=False)
    ckpt.tie_weights()
    a, b = _policy_loss(exported), _policy_loss(ckpt)
    assert a == pytest.approx(b, rel=1e-6)
    untrained = _policy_loss(transformers.AutoModelForCausalLM.from_config(exported.config))
    assert a < untrained - 0.5


def test_resume_reproduces_the_uninterrupted_run(sft_run, tmp_path):
    base, _ = sft_run
    args = ["--stage", "sft", *FAST, *STEPS, "--run.output_dir", str(tmp_path)]
    first = torchrun([*args, "--train.stop_after_steps", "2"], tmp_path)
    assert (tmp_path / "sft" / "preempted").exists() and not (tmp_path / "sft" / "export").exists()
    assert "stopped early at step 2" in first.stdout
    second = torchrun(args, tmp_path)  # same command: resumes on its own
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    assert not (tmp_path / "sft" / "preempted").exists()
    assert losses(tmp_path / "sft") == pytest.approx(losses(base / "sft"), rel=1e-6, abs=1e-7)


def test_fused_head_matches_unfused_path(tmp_path):
    """Per-step losses with the fused kernel equal the logits path, tied (the head hides from DeepSpeed's
    backward hooks) and untied embeddings alike (ZeRO-3, 2 ranks, one process group: tests/run_configs.py)."""
    loss, runs = "redi", []
    for tied in ("true", "false"):
        for impl in ("torch", "reference"):
            runs.append(["--config", "tiny", "--stage", loss, *FAST, "--model.name_or_path", "tiny",
                         "--model.sft_if_missing", "false", "--train.max_steps", "3", "--train.lr", "1e-3",
                         "--train.export", "false", "--model.tiny.tie_word_embeddings", tied, "--kernel.impl", impl,
                         "--run.output_dir", str(tmp_path / f"{tied}-{impl}")])
    run_configs(runs, tmp_path, nproc=2)
    for tied in ("true", "false"):
        fused, ref = losses(tmp_path / f"{tied}-torch" / loss), losses(tmp_path / f"{tied}-reference" / loss)
        assert len(fused) == 3 and fused == pytest.approx(ref, rel=1e-4, abs=1e-5), tied
        assert fused[-1] < fused[0]
    rows = [json.loads(x) for x in (tmp_path / "true-torch" / loss / "metrics.jsonl").read_text().splitlines()]
    assert all({"logp_chosen", "logp_rejected", "margin", "grad_norm", "lr", "target_tokens", "skipped_steps"}
               <= set(r) for r in rows)


def test_tied_head_is_not_gathered_for_its_backward(tmp_path):
    """ZeRO-3 with every parameter released after use (a model too big to keep resident): per micro batch the
    tied head weight is gathered twice in forward (embedding, head) and once in backward (the embedding's),
    not twice: the one-pass head formed its gradients in forward and needs no weight in backward."""
    out = tmp_path / "gather.json"
    zero = ("{stage3_param_persistence_threshold: 0, stage3_max_live_parameters: 0, stage3_max_reuse_distance: 0, "
            "stage3_prefetch_bucket_size: 0}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "kernels" / "bench_zero3_gather.py"), "--loss", "redi", "--steps", "2", "--json", str(out),
           "--train.micro_batch_size", "2", "--deepspeed.zero", zero, "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    per_micro = res["per_step_mib"]
    accum = 2  # global 8 = micro 2 x accum 2 x 2 ranks
    assert per_micro["backward/head"] == pytest.approx(accum * res["head_mib"], rel=1e-3)
    assert per_micro["forward/head"] == pytest.approx(2 * accum * res["head_mib"], rel=1e-3)


def test_dpo_reference_pass_and_simpo_run(tmp_path):
    """DPO's reference log-probs come from one pass before training: at step 1 policy == reference, so the
    loss is exactly -log sigmoid(0) = log 2. SimPO runs on the two-pass (non-linear) kernel path."""
    import math

    common = ["--config", "tiny", *FAST[2:], "--model.name_or_path", "tiny", "--train.max_steps", "2",
              "--train.export", "false", "--data.synthetic_size", "16"]
    r = torchrun(["--stage", "dpo", *common, "--run.output_dir", str(tmp_path / "dpo")], tmp_path)
    assert "reference log-probs computed for 16 examples" in r.stdout
    dpo = losses(tmp_path / "dpo" / "dpo")
    assert dpo[0] == pytest.approx(math.log(2), abs=1e-6) and dpo[1] != pytest.approx(math.log(2), abs=1e-6)
    torchrun(["--stage", "simpo", *common, "--run.output_dir", str(tmp_path / "simpo")], tmp_path)
    simpo = losses(tmp_path / "simpo" / "simpo")
    assert len(simpo) == 2 and all(math.isfinite(x) and x > 0 for x in simpo)


def test_trainer_consumes_prepared_data(tmp_path):
    """OpenR1-style raw rows -> redi_ds.data.prepare -> data.path: DIR for both stages (SFT reads sft/, REDI pairs/)."""
    from redi_ds.data import synthetic
    from redi_ds.data.prepare import PrepareOptions, prepare

    raw = tmp_path / "raw.jsonl"
    with open(raw, "w") as f:
        for p in synthetic.generate(12, seed=5):
            f.write(json.dumps({"problem": p["problem"], "answer": p["answer"], "source": "synthetic",
                                "problem_is_valid": "yes", "generations": [p["rejected"], p["chosen"]],
                                "correctness": {"llama_verification": [False, True],
                                                "math_verify_reparsed_answer": [False, True]}}) + "\n")
    stats = prepare(PrepareOptions(source=str(raw), out=str(tmp_path / "data"), decontam=False, quiet=True))
    assert json.loads(json.dumps(stats))  # serialisable report
    common = [*FAST, "--data.path", str(tmp_path / "data"), "--train.max_steps", "1", "--train.export", "false",
              "--run.output_dir", str(tmp_path / "out"), "--model.name_or_path", "tiny"]
    r = torchrun(["--stage", "sft", *common], tmp_path, nproc=1)
    assert "(sft): 12/12 examples kept" in r.stdout
    r = torchrun(["--stage", "redi", *common, "--model.sft_if_missing", "false"], tmp_path, nproc=1)
    assert "(pairs): 12/12 examples kept" in r.stdout
    assert len(losses(tmp_path / "out" / "redi")) == 1
