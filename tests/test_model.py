"""The body/head split, gradient checkpointing, and the LR schedules, in process (no DeepSpeed)."""

import pytest
import torch

from redi_ds.config import ModelConfig, TinyModelConfig
from redi_ds.losses import loss_config
from redi_ds.data.collate import collate
from redi_ds.data.layout import PAIRS
from redi_ds.kernels import FusedHeadOptions
from redi_ds.losses import StepTotals, build_loss
from redi_ds.model import PolicyModel, build_model, resolve_model_path
from redi_ds.schedule import lr_lambda, step_indices

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
EXAMPLES = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10], "rejected_ids": [11, 12]},
            {"prompt_ids": [13, 14], "chosen_ids": [15], "rejected_ids": [16, 17, 18, 19]}]


def _policy(impl="torch", gc=False, loss="redi"):
    hf = build_model(ModelConfig(tiny=TINY, gradient_checkpointing=gc), "tiny", torch.float64, seed=3)
    return PolicyModel(hf, build_loss(loss_config(loss)), FusedHeadOptions(impl=impl, chunk_size=3))


def _loss_and_grads(model, batch):
    model.train()
    loss, metrics = model(batch, StepTotals(examples=2, tokens=int(batch["counts"].sum())))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, metrics


@pytest.mark.parametrize("padding_free", [False, True])
def test_fused_policy_matches_reference_and_grads_reach_tied_weight(padding_free):
    batch = collate(EXAMPLES, PAIRS, pad_id=0, padding_free=padding_free)
    fused, g_fused, m = _loss_and_grads(_policy("torch"), batch)
    ref, g_ref, _ = _loss_and_grads(_policy("reference"), batch)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    assert set(g_fused) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-8, atol=1e-12)
    # tied: lm_head and embed_tokens are one Parameter, its grad has the head's and the embedding's parts
    model = _policy("torch")
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight
    assert "hf.lm_head.weight" not in g_ref  # named_parameters lists the shared tensor once
    assert {"logp_chosen", "logp_rejected", "margin"} <= set(m)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    batch = collate(EXAMPLES, PAIRS, pad_id=0)
    a, ga, _ = _loss_and_grads(_policy(gc=False), batch)
    b, gb, _ = _loss_and_grads(_policy(gc=True), batch)
    assert _policy(gc=True).hf.model.gradient_checkpointing
    torch.testing.assert_close(a, b)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name])


def test_nonlinear_loss_runs_on_the_two_pass_path():
    batch = collate(EXAMPLES, PAIRS, pad_id=0)
    a, ga, _ = _loss_and_grads(_policy("torch", loss="simpo"), batch)
    b, gb, _ = _loss_and_grads(_policy("reference", loss="simpo"), batch)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-8, atol=1e-12)


def test_schedules_hand_computed():
    lin = lr_lambda("linear", warmup=2, total=10, min_ratio=0.0)
    assert [round(lin(s), 6) for s in (0, 1, 2, 6, 10)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.5, 0.0]
    cos = lr_lambda("cosine", warmup=0, total=10, min_ratio=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.55) and cos(10) == pytest.approx(0.1)
    assert lr_lambda("constant", 1, 10, 0.0)(7) == 1.0


def test_data_order_is_a_function_of_seed_and_step():
    a = [step_indices(10, 4, seed=1, step=s, shuffle=True) for s in range(4)]
    assert a == [step_indices(10, 4, seed=1, step=s, shuffle=True) for s in range(4)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1])) and len(set(a[0] + a[1])) == 8  # no repeats in an epoch
    assert a[2] != a[0]  # a new epoch reshuffles
    assert step_indices(10, 4, seed=1, step=1, shuffle=False) == [4, 5, 6, 7]


def test_sft_export_reference(tmp_path):
    """@sft is the SFT stage's export once that stage is done; before (an export a kill left half-written, say)
    it is a one-line error that says how to finish it."""
    from redi_ds.errors import ConfigError

    (tmp_path / "sft" / "export").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"the sft stage in .* is not finished \(no done marker\); run --stage sft"):
        resolve_model_path("@sft", str(tmp_path))
    (tmp_path / "sft" / "done").write_text("{}")
    assert resolve_model_path("@sft", str(tmp_path)) == str(tmp_path / "sft" / "export")
    assert resolve_model_path("Qwen/Qwen2.5-Math-1.5B", "runs/x") == "Qwen/Qwen2.5-Math-1.5B"


def test_resume_drops_metric_rows_past_the_checkpoint(tmp_path):
    import json

    from redi_ds.stage import StageDir

    stage = StageDir(tmp_path)
    stage.truncate_metrics(3)  # no file yet: nothing to do
    for s in range(1, 6):
        stage.append_metrics({"step": s, "loss": 1.0 / s})
    stage.truncate_metrics(3)
    assert [json.loads(x)["step"] for x in stage.metrics.read_text().splitlines()] == [1, 2, 3]
    assert stage.last_metrics() == {"step": 3, "loss": 1.0 / 3}


DIVERGE = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9, 10], "rejected_ids": [7, 8, 11, 12, 13]},
           {"prompt_ids": [14], "chosen_ids": [15, 16], "rejected_ids": [17, 16, 18]}]


def test_collate_marks_the_divergent_span():
    """Rejected responses share a prefix with the chosen ones: 2 tokens (7, 8) for pair 1, none for pair 2."""
    b = collate(DIVERGE, PAIRS, pad_id=0)
    assert b["span_counts"].tolist() == [4, 2, 3, 3] and b["counts"].tolist() == [4, 2, 5, 3]
    # row 2 (rejected of pair 1) = [5, 6, 7, 8, 11, 12, 13]: position t predicts token t + 1
    assert b["targets"][2].tolist() == [-100, 7, 8, 11, 12, 13, -100]
    assert b["span_mask"][2].tolist() == [False, False, False, True, True, True, False]
    p = collate(DIVERGE, PAIRS, pad_id=0, padding_free=True)
    assert p["span_counts"].tolist() == [4, 2, 3, 3]
    assert p["span_mask"][0][p["targets"][0] != -100].sum() == 12


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_divergent_span_matches_a_float64_hand_computation(padding_free, impl):
    """REDI with negative_span: divergent, through the fused head's per-token coefficients, equals
    mean_b [-lp(y+)/|y+| + alpha sum_{t >= d} logp(y-_t) / (|y-| - d)] computed token by token in float64."""
    from redi_ds.kernels import reference_token_logprobs

    alpha = 0.8
    hf = build_model(ModelConfig(tiny=TINY), "tiny", torch.float64, seed=3)
    model = PolicyModel(hf, build_loss(loss_config("redi", alpha=alpha, negative_span="divergent")),
                        FusedHeadOptions(impl=impl, chunk_size=3))
    batch = collate(DIVERGE, PAIRS, pad_id=0, padding_free=padding_free)
    totals = StepTotals(examples=2, tokens=int(batch["counts"].sum()))
    loss, metrics = model(batch, totals)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = build_model(ModelConfig(tiny=TINY), "tiny", torch.float64, seed=3)
    expected = 0.0
    for e in DIVERGE:
        d = next(i for i, (x, y) in enumerate(zip(e["chosen_ids"], e["rejected_ids"])) if x != y)
        for ids, start, sign in ((e["chosen_ids"], 0, -1.0), (e["rejected_ids"], d, alpha)):
            seq = torch.tensor([e["prompt_ids"] + ids])
            hidden = ref.model(input_ids=seq).last_hidden_state
            labels = torch.full_like(seq, -100)
            p = len(e["prompt_ids"])
            labels[0, p - 1 + start:-1] = seq[0, p + start:]  # position t predicts t + 1, from the span on
            tok = reference_token_logprobs(hidden, ref.lm_head.weight, labels)
            expected = expected + sign * tok.sum() / (len(ids) - start) / 2
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got["hf." + name], p.grad, rtol=1e-8, atol=1e-12)
    # the metrics still describe the whole traces
    assert metrics["logp_rejected"] < 0


def test_an_export_loads_back_the_tokenizer_it_trained_with(tmp_path):
    from pathlib import Path

    ROOT = Path(__file__).resolve().parent.parent
    """transformers 5 loads a folder with a qwen2 config.json as Qwen2Tokenizer, rebuilt from the vocabulary: the
    character-level arith tokenizer then loses its newlines. Our loader and the export's round trip keep the
    folder's own tokenizer.json."""
    import json

    import transformers

    from redi_ds.hf_tokenizer import auto_tokenizer, encode, save_tokenizer

    arith = auto_tokenizer(str(ROOT / "redi_ds" / "assets" / "tokenizer" / "arith"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    save_tokenizer(arith, str(tmp_path))
    plain = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    nl = arith.convert_tokens_to_ids("\n")
    assert nl not in encode(plain, "1\n2")  # what AutoTokenizer alone gives (the bug this guards against)
    loaded = auto_tokenizer(str(tmp_path))
    assert encode(loaded, "1\n2") == encode(arith, "1\n2") == [arith.convert_tokens_to_ids(c) for c in "1\n2"]
    assert loaded.chat_template == arith.chat_template
    qwen = auto_tokenizer(str(ROOT / "redi_ds" / "assets" / "tokenizer" / "qwen2.5"))
    assert type(qwen).__name__ == "Qwen2Tokenizer"  # AutoTokenizer's choice stands when the two agree
    import redi_ds.hf_tokenizer as hf_tokenizer

    hf_tokenizer_auto = hf_tokenizer.auto_tokenizer
    try:  # a folder that loads back as another tokenizer fails the export
        hf_tokenizer.auto_tokenizer = lambda source: qwen
        with pytest.raises(RuntimeError, match="does not load back to the training tokenizer"):
            save_tokenizer(arith, str(tmp_path / "other"))
    finally:
        hf_tokenizer.auto_tokenizer = hf_tokenizer_auto
