"""On-policy distillation (the distill stage: redi_ds.rollout, redi_ds.losses.distill)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from redi_ds.config import ModelConfig, TinyModelConfig, load_config
from redi_ds.data.collate import collate_sequences
from redi_ds.errors import ConfigError
from redi_ds.kernels import FusedHeadOptions
from redi_ds.kernels.reference import IGNORE_INDEX
from redi_ds.losses import StepTotals, build_loss, loss_config
from redi_ds.losses.distill import kl_coefficients
from redi_ds.model import PolicyModel, build_model

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_per_token_coefficients_give_the_estimators_gradient(packed, impl):
    """The distill loss through the fused head (one pass, per-token coefficients) has the gradient of
    -(1/N) sum_t sg(A_t) log_softmax(W h)_t[y_t] by autograd of the model's own logits, in float64."""
    g = torch.Generator().manual_seed(0)
    seqs, rewards = [], []
    for n_prompt, n_done in ((3, 5), (2, 1), (4, 7)):
        ids = torch.randint(1, 64, (n_prompt + n_done,), generator=g).tolist()
        seqs.append((ids, [False] * n_prompt + [True] * n_done, 0))
        rewards.append([0.0] * n_prompt + torch.randn(n_done, generator=g, dtype=torch.float64).tolist())
    n = sum(sum(m) for _, m, _ in seqs)
    values = [kl_coefficients(torch.tensor(r, dtype=torch.float64), n, 0.7).tolist() for r in rewards]
    batch = collate_sequences(seqs, 0, packed, values)
    batch["token_coeffs"] = batch.pop("token_values")
    hf = build_model(ModelConfig(tiny=TINY), "tiny", torch.float64, seed=3)
    own = build_model(ModelConfig(tiny=TINY), "tiny", torch.float64, seed=3)
    policy = PolicyModel(hf, build_loss(loss_config("distill", kl_coef=0.7)), FusedHeadOptions(impl=impl))
    share, _ = policy(batch, StepTotals(examples=3, tokens=n))
    share.backward()
    # the oracle: the model's own logits, A_t laid out by hand from the rewards
    logits = own(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits
    logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"].clamp(min=0)[..., None]).squeeze(-1)
    picked = batch["targets"] != IGNORE_INDEX
    a = torch.zeros_like(logp)
    flat_rewards = [r for rs, (_, m, _) in zip(rewards, seqs) for r, keep in zip(rs[1:], m[1:]) if keep]
    a[picked] = torch.tensor(flat_rewards, dtype=torch.float64)
    oracle = -(0.7 / n) * (a * logp)[picked].sum()
    oracle.backward()
    assert float(share) == pytest.approx(float(oracle), rel=1e-12)
    ours = {k[len("hf."):]: p.grad for k, p in policy.named_parameters()}
    for k, p in own.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_distill_refuses_sequence_parallelism_and_needs_a_teacher():
    with pytest.raises(ConfigError, match=r"does not run under sequence parallelism"):
        load_config("tiny", stage="distill", overrides=["--deepspeed.sequence_parallel_size", "2"])
    with pytest.raises(ConfigError, match=r"teacher.name_or_path is empty"):
        load_config("tiny", stage="sft", overrides=["--loss.name", "distill"])
    with pytest.raises(ConfigError, match=r"loss.mix = 'dpo'"):
        load_config("tiny", stage="distill", overrides=["--loss.mix", "dpo"])


# ----------------------------------------------------------------------------- end to end


def _reverse_kl(student, teacher, prompts: list[list[int]], new_tokens: int = 16) -> float:
    """Mean per-token KL(p_S || p_T) over the student's own sampled continuations of held-out prompts, with both
    models' own HF forwards (full distributions, not the trainer's estimator)."""
    torch.manual_seed(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = student.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                   top_k=0, max_new_tokens=new_tokens, pad_token_id=0)
            ls = torch.log_softmax(student(out).logits[0, len(p) - 1:-1].double(), -1)
            lt = torch.log_softmax(teacher(out).logits[0, len(p) - 1:-1].double(), -1)
            total += float((ls.exp() * (ls - lt)).sum())
            count += ls.shape[0]
    return total / count


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A teacher (the SFT export of 24 steps), then 20 distill steps of a fresh student, once uninterrupted and
    once stopped after 2 steps and resumed."""
    from trainutil import FAST, torchrun

    tmp = tmp_path_factory.mktemp("distill")
    base = [*FAST, "--train.global_batch_size", "4", "--train.micro_batch_size", "2"]
    torchrun(["--stage", "sft", *base, "--train.epochs", "3", "--train.max_steps", "24", "--run.output_dir",
              str(tmp / "teacher")], tmp)
    distill = ["--stage", "distill", *base, "--teacher.name_or_path", str(tmp / "teacher" / "sft" / "export"),
               "--rollout.samples", "2", "--rollout.max_new_tokens", "16", "--rollout.log_every", "1",
               "--train.lr", "1e-2", "--train.warmup_ratio", "0"]
    whole = torchrun([*distill, "--train.max_steps", "20", "--run.output_dir", str(tmp / "whole")], tmp)
    torchrun([*distill, "--train.max_steps", "4", "--run.output_dir", str(tmp / "cut"),
              "--train.stop_after_steps", "2"], tmp)
    resumed = torchrun([*distill, "--train.max_steps", "4", "--run.output_dir", str(tmp / "cut")], tmp)
    short = torchrun([*distill, "--train.max_steps", "4", "--run.output_dir", str(tmp / "short")], tmp)
    return tmp, whole, resumed, short


@pytest.mark.slow
def test_the_students_reverse_kl_to_the_teacher_falls(distilled):
    import transformers

    from redi_ds.data import synthetic

    tmp, whole, _, _ = distilled
    cfg = load_config("tiny", stage="distill", overrides=["--model.tokenizer", "arith", "--model.chat_template", "null",
                                                          "--model.tiny.vocab_size", "64", "--data.system_prompt",
                                                          "null"])
    from redi_ds.model import load_tokenizer

    tok = load_tokenizer(cfg.model, "tiny")
    held_out = [tok.apply_chat_template([{"role": "user", "content": p["problem"]}], add_generation_prompt=True)
                for p in synthetic.generate(6, seed=999)]
    held_out = [p if isinstance(p, list) else p["input_ids"] for p in held_out]
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tmp / "teacher" / "sft" / "export").eval()
    before = build_model(cfg.model, "tiny", torch.float32, seed=cfg.run.seed, tokenizer=tok).eval()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp / "whole" / "distill" / "export").eval()
    kl_before, kl_after = _reverse_kl(before, teacher, held_out), _reverse_kl(after, teacher, held_out)
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)
    rows = [json.loads(x) for x in (tmp / "whole" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert {"kl", "teacher_logp", "student_logp", "sample_tokens", "truncated"} <= set(rows[0])


@pytest.mark.slow
def test_a_resumed_distill_run_draws_the_same_samples_and_losses(distilled):
    from trainutil import losses

    tmp, _, resumed, _ = distilled
    assert "resumed from" in resumed.stdout
    assert losses(tmp / "cut" / "distill") == pytest.approx(losses(tmp / "short" / "distill"), rel=1e-6, abs=1e-7)
    a = (tmp / "cut" / "distill" / "rollouts.jsonl").read_text().splitlines()
    b = (tmp / "short" / "distill" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(x)["completion"] for x in a] == [json.loads(x)["completion"] for x in b]


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_is_refused(distilled, tmp_path):
    from trainutil import FAST, python_train

    tmp, _, _, _ = distilled
    args = ["--stage", "distill", *FAST, "--teacher.name_or_path", str(tmp / "teacher" / "sft" / "export"),
            "--model.tokenizer", "qwen2.5", "--model.chat_template", "qwen2.5-math", "--model.tiny.vocab_size",
            "151936", "--train.max_steps", "1", "--run.output_dir", str(tmp_path / "out")]
    r = python_train(args, tmp_path, check=False)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"its tokenizer is not the student's .*cross-tokenizer distillation is not supported", err[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and vllm")
def test_vllm_rollouts_sample_from_the_synced_student(tmp_path):
    """The colocated vLLM sampler, its weights synced from the trainer before every step (GPU only)."""
    pytest.importorskip("vllm")
    from trainutil import FAST, python_train

    out = tmp_path / "run"
    python_train(["--stage", "sft", *FAST, "--train.max_steps", "4", "--run.output_dir", str(out)], tmp_path)
    r = python_train(["--stage", "distill", *FAST, "--model.name_or_path", "@sft", "--teacher.name_or_path", "@sft",
                      "--rollout.backend", "vllm", "--rollout.log_every", "1", "--train.max_steps", "2",
                      "--run.output_dir", str(out)], tmp_path)
    assert (out / "distill" / "done").exists() and (out / "distill" / "rollouts.jsonl").read_text(), r.stdout
