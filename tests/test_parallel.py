"""Sequence parallelism (redi_ds.parallel): sharding and packed attention in process; DeepSpeed's Ulysses on 2
CPU ranks (gloo all-to-all) against the unsharded model in float64; training with sequence_parallel_size 2."""

from __future__ import annotations

import json

import pytest
import torch

from redi_ds.data.collate import collate
from redi_ds.data.layout import PAIRS, SFT_ROWS
from redi_ds.parallel import SequenceParallel, packed_sdpa

EXAMPLES = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13]},
            {"prompt_ids": [14], "chosen_ids": [15], "rejected_ids": [16, 17, 18, 19, 20]}]


def _sp(rank: int, size: int = 2) -> SequenceParallel:
    return SequenceParallel(size=size, rank=rank, group=None, mpu=None, pad_id=0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("size", [2, 3])
def test_shards_tile_the_padded_batch(packed, size):
    """Rows of odd length are padded to a multiple of N; the shards, put back together, are the padded row;
    the targets (shifted on the whole row) cross shard boundaries; counts stay global."""
    batch = collate(EXAMPLES, PAIRS, pad_id=0, padding_free=packed)
    shards = [_sp(r, size).shard(batch) for r in range(size)]
    t = batch["input_ids"].shape[-1]
    width = -(-t // size) * size
    for key in ("input_ids", "targets", "position_ids", "span_mask"):
        whole = torch.cat([s[key] for s in shards], dim=-1)
        assert whole.shape[-1] == width
        torch.testing.assert_close(whole[..., :t], batch[key])
    tail = torch.cat([s["targets"] for s in shards], dim=-1)[..., t:]
    assert (tail == -100).all()  # padding is never a target
    pos = torch.cat([s["position_ids"] for s in shards], dim=-1)
    assert (pos[..., t:] > 0).all()  # padding continues the last sequence: no new sequence starts there
    for s in shards:
        assert torch.equal(s["counts"], batch["counts"]) and s["attention_mask"] is None
    if packed:
        ids = torch.cat([s["seq_ids"] for s in shards], dim=-1)
        assert (ids[..., t:] == batch["seq_ids"][..., -1:]).all()


def test_a_sequence_shorter_than_the_group():
    """Two tokens over three ranks: one shard holds padding only, and nothing is lost."""
    batch = collate([{"prompt_ids": [1], "response_ids": [2]}], SFT_ROWS, pad_id=0)
    shards = [_sp(r, 3).shard(batch) for r in range(3)]
    assert [s["input_ids"].shape[-1] for s in shards] == [1, 1, 1]
    assert sum(int((s["targets"] != -100).sum()) for s in shards) == 1


class _Attn(torch.nn.Module):
    num_key_value_groups = 1
    is_causal = True
    training = False


def test_packed_sdpa_keeps_sequences_apart_and_plain_sdpa_does_not():
    """A packed row of two sequences (positions restart at 0) through packed_sdpa equals each sequence alone;
    plain causal attention over the row (what sdpa does under Ulysses, which drops the mask) lets the second
    attend to the first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    out, _ = packed_sdpa(_Attn(), q, k, v, None, position_ids=pos)
    parts = [sdpa_attention_forward(_Attn(), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None)[0] for a, b in
             ((0, 3), (3, 7))]
    torch.testing.assert_close(out, torch.cat(parts, dim=1))
    leaky, _ = sdpa_attention_forward(_Attn(), q, k, v, None)
    assert not torch.allclose(leaky[:, 3:], out[:, 3:])
    torch.testing.assert_close(leaky[:, :3], out[:, :3])  # the first sequence sees nothing else either way


def test_heads_that_do_not_split_over_the_group_are_a_config_error():
    import transformers

    from redi_ds.errors import ConfigError
    from redi_ds.parallel import setup

    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    hf = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    with pytest.raises(ConfigError, match="sequence_parallel_size = 3: the model's 4 attention heads"):
        setup(hf, 3, rows_per_forward=1, pad_id=0)


def test_gradient_average_size_per_zero_stage():
    from redi_ds import ds_config
    from redi_ds.errors import ConfigError

    def ds(stage, sp, **zero):
        return {"zero_optimization": {"stage": stage, **zero}, "sequence_parallel_size": sp}

    assert ds_config.gradient_average_size(ds(3, 1), 8) == 8
    assert ds_config.gradient_average_size(ds(2, 1), 8) == 8
    assert ds_config.gradient_average_size(ds(2, 2), 8) == 4  # ZeRO 0-2: data parallel only
    assert ds_config.gradient_average_size(ds(3, 2), 8) == 8  # ZeRO-3's reduce-scatter: the whole world
    ds_config.check_sequence_parallel(ds(3, 2))
    ds_config.check_sequence_parallel(ds(3, 1, reduce_scatter=False))
    with pytest.raises(ConfigError, match="reduce_scatter = false with sequence_parallel_size > 1"):
        ds_config.check_sequence_parallel(ds(3, 2, reduce_scatter=False))


# ----------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_ulysses_with_the_fused_head_on_shards_matches_the_whole_sequence(tmp_path):
    """2 ranks, DeepSpeed's Ulysses, a tiny Qwen2 in float64: per-sequence log-prob sums (all-reduced over the
    SP group) and every parameter's gradient (summed over ranks) equal one process on the whole batch, packed
    and padded, linear and non-linear losses; with plain sdpa as the core attention the packed sums differ."""
    from trainutil import torchrun

    out = tmp_path / "sp.json"
    torchrun([str(out)], tmp_path, nproc=2, script=str(__import__("pathlib").Path(__file__).parent / "sp_check.py"))
    res = json.loads(out.read_text())
    for case, r in res["cases"].items():
        assert r["sums_err"] < 1e-10, (case, r)
        assert r["grad_err"] < 1e-9, (case, r)
    assert res["leak"]["sums_err"] > 1e-3, res["leak"]  # the counter-test: the boundary ignored is caught


def _sp_args(loss: str, data, out, *, sp: int, packed: bool, zero: int = 3, extra=()) -> list[str]:
    zero_args = ["--deepspeed.config", "zero3", "--deepspeed.zero", "{stage3_param_persistence_threshold: 0}"] \
        if zero == 3 else ["--deepspeed.config", "zero2"]
    return ["--config", "arith", "--stage", loss, "--data.path", str(data), "--run.output_dir", str(out),
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "4",
            "--train.lr", "1e-3", "--train.warmup_ratio", "0", "--train.export", "false",
            "--tracking.enabled", "false", *zero_args,
            "--deepspeed.sequence_parallel_size", str(sp), "--data.padding_free", str(packed).lower(), *extra]


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory):
    """The same training three ways: 1 rank without SP; 2 ranks with SP 2 (the same global batch: data-parallel
    size 1); and 2 ranks with SP 2 stopped at step 2, then resumed by 2 ranks without SP (data-parallel 2)."""
    from redi_ds.ablation import task
    from trainutil import run_configs

    tmp = tmp_path_factory.mktemp("sp")
    rows = task.generate(task.TaskConfig(teacher_problems=32, sft_problems=1, stage2_problems=1, val_problems=1,
                                         test_problems=1))["teacher"]
    paths = {"sft": str(task.write_jsonl(tmp / "sft.jsonl", ({"problem": r["problem"], "response": r["response"]}
                                                             for r in rows[:16]))),
             "pairs": str(task.write_jsonl(tmp / "pairs.jsonl", ({"prompt": a["problem"], "chosen": a["response"],
                                                                  "rejected": b["response"]}  # another problem's trace
                                                                 for a, b in zip(rows[:16], rows[16:]))))}
    cases = [("redi", True, 3), ("redi", False, 3), ("sft", True, 3), ("dpo", True, 3), ("redi", True, 2)]

    def data(loss):
        return paths["sft"] if loss == "sft" else paths["pairs"]

    run_configs([_sp_args(loss, data(loss), tmp / f"one-{loss}-{packed}-{zero}", sp=1, packed=packed, zero=zero)
                 for loss, packed, zero in cases], tmp, nproc=1)
    run_configs([_sp_args(loss, data(loss), tmp / f"sp2-{loss}-{packed}-{zero}", sp=2, packed=packed, zero=zero)
                 for loss, packed, zero in cases]
                + [_sp_args("redi", data("redi"), tmp / "switch", sp=2, packed=True,
                            extra=("--train.stop_after_steps", "2"))], tmp, nproc=2)
    run_configs([_sp_args("redi", data("redi"), tmp / "switch", sp=1, packed=True)], tmp, nproc=2)
    return tmp, cases


@pytest.mark.slow
def test_sequence_parallel_training_matches_one_rank(sp_runs):
    from trainutil import losses

    tmp, cases = sp_runs
    for loss, packed, zero in cases:
        one = losses(tmp / f"one-{loss}-{packed}-{zero}" / loss)
        two = losses(tmp / f"sp2-{loss}-{packed}-{zero}" / loss)
        assert len(one) == 4 and two == pytest.approx(one, rel=1e-4), (loss, packed, zero, one, two)
        assert one[-1] != pytest.approx(one[0], rel=1e-3)
        # AdamW and clipping hide a constant factor in the gradient; its norm does not (ZeRO-3 averages over
        # the whole world, ZeRO-2 over data parallel: redi_ds.ds_config.gradient_average_size)
        norms = [_column(tmp / f"{k}-{loss}-{packed}-{zero}" / loss, "grad_norm") for k in ("one", "sp2")]
        assert norms[1] == pytest.approx(norms[0], rel=1e-4), (loss, packed, zero, norms)


def _column(stage_dir, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_checkpoint_written_with_sp2_resumes_without_sp(sp_runs):
    """Same world (2 ranks), another sequence_parallel_size: ZeRO-3 partitions over the whole world either way,
    so the checkpoint loads, and the resumed run (data-parallel 2) continues the same objective."""
    from trainutil import losses

    tmp, _ = sp_runs
    resumed = losses(tmp / "switch" / "redi")
    assert resumed == pytest.approx(losses(tmp / "one-redi-True-3" / "redi"), rel=1e-4)
    meta = json.loads((tmp / "switch" / "redi" / "checkpoints" / "step_4" / "meta.json").read_text())
    assert meta["sequence_parallel_size"] == 1 and meta["world_size"] == 2
