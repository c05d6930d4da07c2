"""Any causal LM, exactly, or a one-line refusal (redi_ds.families).

Tiny random models of many families in float64, the head scaled so that the raw logits have std ~8 (at random-init
scale a softcap of 30 is the identity to 1e-6 and would hide a missing one). For each family, PolicyModel's
sequence log-prob sums and the gradients of every parameter, in both forms (the one-pass linear loss and the
two-pass form), equal those of the model's own forward (<= 1e-6), tied and untied, padded and packed where the body
keeps packed sequences apart; or the family is refused in one line.
"""

from __future__ import annotations

import copy

import pytest
import torch

from redi_ds.data.collate import collate
from redi_ds.data.layout import PAIRS
from redi_ds.errors import ConfigError
from redi_ds.families import body_and_head, check_head, check_packing, transform_for
from redi_ds.kernels import FusedHeadOptions
from redi_ds.kernels.reference import IGNORE_INDEX
from redi_ds.losses import build_loss, loss_config
from redi_ds.model import PolicyModel

V, H = 64, 32
SMALL = dict(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _cfg(name: str, tied: bool):
    import transformers as t

    small = dict(SMALL, tie_word_embeddings=tied)
    head_dim = dict(head_dim=8)
    table = {
        "qwen2": lambda: t.Qwen2Config(**small),
        "qwen3": lambda: t.Qwen3Config(**small, **head_dim),
        "llama": lambda: t.LlamaConfig(**small),
        "mistral": lambda: t.MistralConfig(**small),
        "gemma2": lambda: t.Gemma2Config(**small, **head_dim, final_logit_softcapping=30.0,
                                         attn_logit_softcapping=50.0, query_pre_attn_scalar=8),
        "gemma3": lambda: t.Gemma3TextConfig(**small, **head_dim, final_logit_softcapping=30.0,
                                             query_pre_attn_scalar=8, sliding_window=16),
        "cohere": lambda: t.CohereConfig(**small, logit_scale=0.0625),
        "granite": lambda: t.GraniteConfig(**small, logits_scaling=8.0),
        "gpt2": lambda: t.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=128,
                                     tie_word_embeddings=tied),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128,
                                            tie_word_embeddings=tied),
        "qwen3_5": lambda: t.Qwen3_5TextConfig(**small, **head_dim,
                                               layer_types=["linear_attention", "full_attention"],
                                               linear_num_key_heads=2, linear_num_value_heads=2,
                                               linear_key_head_dim=8, linear_value_head_dim=8),
    }
    cfg = table[name]()
    cfg._attn_implementation = "eager" if name == "gemma2" else "sdpa"
    return cfg


FAMILIES = ["qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3", "cohere", "granite", "gpt2", "gpt_neox",
            "qwen3_5"]
PACKING_REFUSED = {"qwen3_5"}  # Gated DeltaNet layers carry state across a packed row's sequences


def tiny(name: str, tied: bool = True, seed: int = 0):
    """A float64 random model of the family, its head scaled so the raw logits have std ~8."""
    import transformers

    torch.manual_seed(seed)
    cfg = _cfg(name, tied)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=cfg._attn_implementation)
    model = model.double().eval()
    _, head = body_and_head(model)
    with torch.no_grad():
        ids = torch.randint(0, V, (1, 16))
        z = torch.nn.functional.linear(model.get_decoder()(input_ids=ids).last_hidden_state, head.weight)
        head.weight.mul_(8.0 / z.std())
        if head.bias is not None:
            head.bias.normal_(0, 0.5)
    return model


EXAMPLES = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13]},
            {"prompt_ids": [14, 15], "chosen_ids": [16], "rejected_ids": [17, 18, 19, 20, 21]}]


def _own_loss(model, batch, coeffs):
    """The model's own forward: log_softmax of its logits, gathered, summed per sequence, weighted."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    logp = torch.log_softmax(logits, dim=-1)
    t = batch["targets"]
    tok = logp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * (t != IGNORE_INDEX)
    if batch["seq_ids"] is None:
        sums = tok.sum(-1)
    else:
        sums = torch.zeros(batch["num_seqs"], dtype=tok.dtype).index_add(0, batch["seq_ids"].reshape(-1),
                                                                          tok.reshape(-1))
    return (coeffs * sums).sum(), sums


def _grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


CASES = [(name, tied) for name in FAMILIES for tied in (True, False)
         if not (name == "gpt_neox" and tied)]  # GPT-NeoX has no tied head (its embed_out is its own)


@pytest.mark.parametrize("name,tied", CASES, ids=[f"{n}-{'tied' if t else 'untied'}" for n, t in CASES])
def test_family_is_exact_or_refused(name, tied):
    own = tiny(name, tied)
    assert (own.get_output_embeddings().weight is own.get_input_embeddings().weight) == tied
    ids = torch.randint(1, V, (24,), generator=torch.Generator().manual_seed(1))
    assert check_head(own, transform_for(own.config), FusedHeadOptions(impl="torch"), ids) < 1e-9
    packs = name not in PACKING_REFUSED
    if packs:
        assert check_packing(own, ids) <= 1e-6  # 0 leak; packed vs alone to rounding (Gemma2 eager: fp32 softmax)
    else:
        with pytest.raises(ConfigError, match=r"^data.padding_free: true mixes the sequences of a packed row"):
            check_packing(own, ids)
    for padding_free in ([False, True] if packs else [False]):
        batch = collate(EXAMPLES, PAIRS, pad_id=0, padding_free=padding_free)
        coeffs = torch.tensor([-0.5, -0.25, 0.4, 0.2], dtype=torch.float64)
        ref_loss, ref_sums = _own_loss(own, batch, coeffs)
        ref_loss.backward()
        ref = _grads(own)
        own.zero_grad()
        for impl in ("torch", "reference"):
            for form in ("one_pass", "two_pass"):
                policy = PolicyModel(copy.deepcopy(own), build_loss(loss_config("redi")),
                                     FusedHeadOptions(impl=impl, chunk_size=3))
                if form == "one_pass":
                    loss, sums, _ = policy.sequence_logprobs(batch, coeffs)
                else:
                    _, sums, _ = policy.sequence_logprobs(batch)
                    loss = (coeffs * sums).sum()
                loss.backward()
                got = {n[len("hf."):]: g for n, g in _grads(policy).items()}
                where = f"{name} {'tied' if tied else 'untied'} {impl} {form} packed={padding_free}"
                torch.testing.assert_close(sums.detach(), ref_sums.detach(), rtol=1e-9, atol=1e-9, msg=where)
                assert set(got) == set(ref), where
                for k in ref:
                    torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-9, msg=f"{where}: d{k}")


def test_the_table_reads_each_convention():
    assert str(transform_for(_cfg("gemma2", True))) == "softcap 30"
    assert str(transform_for(_cfg("cohere", True))) == "x 0.0625"
    assert str(transform_for(_cfg("granite", True))) == "x 0.125"
    assert transform_for(_cfg("qwen2", True)).identity and transform_for(_cfg("gpt2", True)).identity
    gemma3 = _cfg("gemma3", True)
    gemma3.final_logit_softcapping = None
    assert transform_for(gemma3).identity


def test_a_family_the_table_does_not_know_is_refused():
    """A model whose forward changes its logits in a way POST_HEAD does not model (here: halves them, as a new
    family might) is refused by the self-check, whatever its name."""
    model = tiny("qwen2")
    forward = model.forward

    def halved(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = halved
    ids = torch.randint(1, V, (24,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match=r"^model \(qwen2\): the fused head does not reproduce the model's own "
                                          r"log-probs \(max difference [0-9.e+-]+ nats"):
        check_head(model, transform_for(model.config), FusedHeadOptions(impl="torch"), ids)


def test_a_head_that_is_not_a_linear_is_refused():
    model = tiny("qwen2", tied=False)

    class Scaled(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x) * 2

    model.lm_head = Scaled(model.lm_head)
    with pytest.raises(ConfigError, match=r"^model \(qwen2\): its LM head is Scaled, not one nn.Linear"):
        body_and_head(model)


# ----------------------------------------------------------------------------- end to end (launch/train.py)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny float32 models of several families saved as HF folders (the arith tokenizer's 64-token vocabulary)."""
    import transformers

    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in ("llama", "qwen3", "gemma2", "cohere", "qwen3_5"):
        model = tiny(name).float()
        model.save_pretrained(root / name)
        out[name] = root / name
    cfg = transformers.DoryConfig(**SMALL)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "dory")
    out["dory"] = root / "dory"
    return out


def _train_args(path, out, *extra):
    return ["--config", "tiny", "--stage", "sft", "--model.name_or_path", str(path), "--model.tokenizer", "arith",
            "--model.chat_template", "null", "--data.system_prompt", "null", "--data.synthetic_size", "16",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.max_steps", "2",
            "--train.export", "false", "--tracking.enabled", "false", "--eval.benchmarks", "[]",
            "--eval.heldout_every", "0", "--deepspeed.precision", "fp32", "--run.output_dir", str(out), *extra]


def _first_step_sft_loss(path) -> float:
    """The SFT loss of step 1's batch from the saved model's own forward (its own logits, its own head code)."""
    import transformers

    from redi_ds.config import load_config
    from redi_ds.data.layout import SFT_ROWS
    from redi_ds.data.sources import load_source
    from redi_ds.data.tokenize import ChatEncoder, encode_dataset
    from redi_ds.model import load_tokenizer
    from redi_ds.schedule import step_indices

    cfg = load_config("tiny", stage="sft", overrides=_train_args(path, "x")[4:])
    tok = load_tokenizer(cfg.model, str(path))
    data, _ = encode_dataset(load_source("synthetic", SFT_ROWS, synthetic_size=16, seed=cfg.run.seed), SFT_ROWS,
                             ChatEncoder(tok, None), cfg.data.max_prompt_length, cfg.data.max_length)
    rows = step_indices(len(data), 4, cfg.run.seed, 0, cfg.data.shuffle)
    batch = collate([data[i] for i in rows], SFT_ROWS, tok.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    t = batch["targets"]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum")
    return float(nll / (t != IGNORE_INDEX).sum())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "cohere"])
def test_training_logs_the_models_own_first_step_loss(saved, name, tmp_path):
    """The trainer's first logged SFT loss is the loss of the model's own logits on the same batch: Gemma2's
    softcap and Cohere's logit scale are applied (without them Cohere's first loss would be ~10x too large)."""
    from trainutil import losses, python_train

    extra = ["--train.export", "true"] if name == "gemma2" else []  # Gemma2 trains and exports with eager on CPU
    r = python_train(_train_args(saved[name], tmp_path / "out", *extra), tmp_path)
    assert "body + fused head reproduce its own log-probs" in r.stdout
    first = losses(tmp_path / "out" / "sft")[0]
    assert first == pytest.approx(_first_step_sft_loss(saved[name]), rel=1e-5)
    if extra:
        import transformers

        assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "sft" / "export") is not None


@pytest.mark.slow
def test_refusals_are_one_line_and_exit_2(saved, tmp_path):
    from trainutil import python_train

    cases = {"dory": ([], r"^error: model \(dory\): its LM head is DoryLMHead, not one nn.Linear"),
             "qwen3_5": (["--data.padding_free", "true"],
                         r"^error: data.padding_free: true mixes the sequences of a packed row in this model "
                         r"\(qwen3_5_text\)")}
    import re

    for name, (extra, message) in cases.items():
        r = python_train(_train_args(saved[name], tmp_path / name, *extra), tmp_path, check=False)
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(err) == 1 and re.match(message, err[0]), (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr


def test_sequence_parallel_refuses_an_eager_only_family():
    """Gemma2 has no sdpa in this transformers: attn auto resolves to eager, which Ulysses cannot run exactly."""
    from redi_ds import parallel
    from redi_ds.model import attention_for, causal_lm_class

    model = tiny("gemma2")
    assert attention_for(causal_lm_class(model.config), "auto", cuda=False) == "eager"
    with pytest.raises(ConfigError, match=r"the model's attention is eager .*sequence parallelism needs sdpa"):
        parallel.setup(model, 2, rows_per_forward=1, pad_id=0)
    with pytest.raises(ConfigError, match=r"model.attn_implementation = sdpa: Gemma2ForCausalLM does not support it"):
        attention_for(causal_lm_class(model.config), "sdpa", cuda=False)
