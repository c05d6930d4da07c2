"""The objective of a step does not depend on how the step is split into ranks and micro batches.

SFT, REDI, DPO and SimPO train for 3 steps on rows of very different lengths (2 to ~300 response tokens),
three ways with the same global batch of 4: 1 rank x micro 4, 2 ranks x micro 2, and 1 rank x micro 1 x 4
accumulation steps. Their per-step losses agree (rel 1e-5). Step 1's SFT and REDI losses also equal the
objective computed independently from the initial model in float64 (a token mean over the whole step for
SFT, a pair mean for REDI). Slow: two processes train the twelve runs (tests/run_configs.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from trainutil import ARITH, losses, run_configs

pytestmark = pytest.mark.slow

LOSSES = ("sft", "redi", "dpo", "simpo")
SPLITS = {"1x4": (1, 4), "2x2": (2, 2), "1x1x4": (1, 1)}  # name: (ranks, micro batch)


def _text(i: int, words: int) -> str:
    return "Step: " + " ".join(f"{(i * 7 + k) % 97}" for k in range(words)) + f" so \\boxed{{{i}}}."


def _write_data(tmp):
    lengths = [1, 150, 7, 60, 2, 110, 25, 4, 90, 3, 40, 12]  # response words: very different lengths
    sft = tmp / "sft.jsonl"
    pairs = tmp / "pairs.jsonl"
    with open(sft, "w") as f:
        for i, n in enumerate(lengths):
            f.write(json.dumps({"prompt": f"Problem {i}: add the numbers.", "response": _text(i, n)}) + "\n")
    with open(pairs, "w") as f:
        for i, n in enumerate(lengths):
            m = lengths[(i + 5) % len(lengths)]
            f.write(json.dumps({"prompt": f"Problem {i}: add the numbers.", "chosen": _text(i, n),
                                "rejected": _text(i + 1, m)}) + "\n")
    return sft, pairs


def _args(loss: str, data, out, micro: int) -> list[str]:
    return ["--config", "tiny", "--stage", loss, "--data.path", str(data), "--model.name_or_path", "tiny",
            "--model.sft_if_missing", "false", "--train.global_batch_size", "4", "--train.micro_batch_size",
            str(micro), "--train.max_steps", "3", "--train.lr", "2e-3", "--train.warmup_ratio", "0",
            "--train.export", "false", "--tracking.enabled", "false", "--eval.heldout_every", "0",
            "--deepspeed.zero", "{stage3_param_persistence_threshold: 0}", "--run.output_dir", str(out), *ARITH]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("objectives")
    sft, pairs = _write_data(tmp)
    by_ranks: dict[int, list] = {1: [], 2: []}
    for split, (ranks, micro) in SPLITS.items():
        for loss in LOSSES:
            by_ranks[ranks].append(_args(loss, sft if loss == "sft" else pairs, tmp / split / loss, micro))
    for ranks, runs_ in by_ranks.items():
        run_configs(runs_, tmp, nproc=ranks)
    return tmp


@pytest.mark.parametrize("loss", LOSSES)
def test_per_step_losses_do_not_depend_on_the_split(runs, loss):
    per_split = {split: losses(runs / split / loss / loss) for split in SPLITS}
    first = per_split["1x4"]
    assert len(first) == 3
    for split, values in per_split.items():
        assert values == pytest.approx(first, rel=1e-5), (split, per_split)
    assert first[-1] != pytest.approx(first[0], rel=1e-3)  # it trained: the steps differ


@pytest.mark.parametrize("loss", ["sft", "redi"])
def test_step_one_equals_the_objective_from_the_initial_model(runs, loss):
    """Independent of the trainer's bookkeeping: float64, the unfused head, the whole step's rows at once."""
    from redi_ds.config import load_config
    from redi_ds.data.collate import collate
    from redi_ds.data.layout import PAIRS, SFT_ROWS
    from redi_ds.data.sources import load_source
    from redi_ds.data.tokenize import ChatEncoder, encode_dataset
    from redi_ds.model import build_model, load_tokenizer
    from redi_ds.kernels import reference_sequence_logprobs
    from redi_ds.schedule import step_indices

    cfg = load_config("tiny", stage=loss, overrides=_args(loss, runs / f"{'sft' if loss == 'sft' else 'pairs'}.jsonl",
                                                           runs / "x", 4)[4:])
    layout = SFT_ROWS if loss == "sft" else PAIRS
    tok = load_tokenizer(cfg.model, "tiny")
    data, _ = encode_dataset(load_source(cfg.data.path, layout), layout, ChatEncoder(tok, cfg.data.system_prompt),
                             cfg.data.max_prompt_length, cfg.data.max_length)
    rows = step_indices(len(data), 4, cfg.run.seed, 0, cfg.data.shuffle)
    model = build_model(cfg.model, "tiny", torch.float32, seed=cfg.run.seed).double().eval()  # the same init
    batch = collate([data[i] for i in rows], layout, tok.pad_token_id)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).last_hidden_state
        sums, counts = reference_sequence_logprobs(hidden, model.lm_head.weight, batch["targets"])
    if loss == "sft":
        expected = float(-sums.sum() / counts.sum())
    else:
        norm = sums / counts
        expected = float((-norm[:4] + 0.8 * norm[4:]).mean())
    assert losses(runs / "1x4" / loss / loss)[0] == pytest.approx(expected, rel=1e-5)
