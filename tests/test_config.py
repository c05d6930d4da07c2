import subprocess
import sys
from pathlib import Path

import pytest

from redi_ds.errors import ConfigError
from redi_ds.config import config_names, grad_accum_steps, load_config, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_configs_and_paper_values():
    assert {"tiny", "paper", "paper-dpo", "paper-simpo"} <= set(config_names())
    sft = load_config("paper", stage="sft")
    assert sft.model.name_or_path == "Qwen/Qwen2.5-Math-1.5B"
    assert sft.model.rope_theta == 300000.0 and sft.model.max_position_embeddings == 32768
    assert (sft.train.lr, sft.train.schedule, sft.train.warmup_ratio, sft.train.weight_decay) == (5e-5, "linear", 0.1, 1e-4)
    assert (sft.train.global_batch_size, sft.data.max_length, sft.train.epochs, sft.run.seed) == (128, 32768, 5, 42)
    assert sft.model.gradient_checkpointing and sft.loss.name == "sft"
    redi = load_config("paper", stage="redi")
    assert (redi.train.lr, redi.train.epochs, redi.train.global_batch_size, redi.loss.alpha) == (1e-6, 1, 32, 0.8)
    assert (redi.data.max_prompt_length, redi.data.max_length, redi.data.padding_free) == (800, 19800, True)
    assert redi.train.grad_clip == 1.0 and redi.train.weight_decay == 1e-4 and redi.model.name_or_path == "@sft"
    assert "\\boxed{}" in redi.data.system_prompt
    dpo = load_config("paper-dpo", stage="dpo")
    assert (dpo.loss.name, dpo.loss.beta, dpo.train.lr) == ("dpo", 0.001, 2e-7)
    simpo = load_config("paper-simpo", stage="simpo")
    assert (simpo.loss.name, simpo.loss.beta, simpo.loss.gamma, simpo.train.lr) == ("simpo", 2.0, 1.0, 5e-7)


def test_one_kernel_options_type_from_yaml_to_kernel():
    from redi_ds.kernels import FusedHeadOptions

    cfg = load_config("tiny", stage="redi", overrides=["--kernel.impl", "reference", "--kernel.block_v", "64",
                                                       "--kernel.num_warps", "8", "--kernel.fp32_weight_grad", "true"])
    assert isinstance(cfg.kernel, FusedHeadOptions)
    assert cfg.kernel == FusedHeadOptions(impl="reference", chunk_size="auto", block_v=64, num_warps=8,
                                          fp32_weight_grad=True)
    assert load_config("tiny", stage="redi", overrides=["--kernel.chunk_size", "128"]).kernel.chunk_size == 128


def test_eval_options_inherit_the_training_prompt():
    from redi_ds.eval import EvalOptions

    cfg = load_config("tiny", stage="sft", overrides=["--data.system_prompt", "Think.", "--eval.samples", "4"])
    assert isinstance(cfg.eval, EvalOptions) and cfg.eval.system_prompt == "Think." and cfg.eval.samples == 4
    own = load_config("tiny", stage="sft", overrides=["--data.system_prompt", "Think.", "--eval.system_prompt", "Eh"])
    assert own.eval.system_prompt == "Eh"


def test_negative_numbers_are_values_not_flags():
    assert parse_overrides(["--train.min_lr_ratio", "-0.5", "--a.b", "-1"]) == [("train.min_lr_ratio", -0.5),
                                                                                ("a.b", -1)]


def test_deepspeed_json_holds_only_zero_and_precision(tmp_path):
    from redi_ds import ds_config

    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3}, "train_batch_size": 64}')
    cfg = load_config("tiny", stage="sft", overrides=["--deepspeed.config", str(bad)])
    with pytest.raises(ConfigError, match=r"'train_batch_size' is set by our config \(train.global_batch_size\)"):
        ds_config.load(cfg.deepspeed)
    ok = load_config("tiny", stage="sft", overrides=["--deepspeed.zero", "{stage3_param_persistence_threshold: 0}"])
    ds = ds_config.build(ok, accum=2, precision="fp32")
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 8 and not ds["bf16"]["enabled"]


def test_overrides_are_typed():
    cfg = load_config("tiny", stage="redi", overrides=["--loss.alpha", "0.5", "--train.lr=1e-6",
                                                       "--deepspeed.zero", "{stage3_param_persistence_threshold: 0}"])
    assert cfg.loss.alpha == 0.5 and cfg.train.lr == 1e-6
    assert cfg.deepspeed.zero == {"stage3_param_persistence_threshold": 0}
    assert parse_overrides(["--a.b", "true", "--c=3"]) == [("a.b", True), ("c", 3)]


@pytest.mark.parametrize("overrides, message", [
    (["--loss.alhpa", "0.5"], "unknown key 'loss.alhpa'"),
    (["--train.lr", "fast"], "train.lr: expected a number, got 'fast'"),
    (["--train.epochs", "1.5"], "train.epochs: expected an integer"),
    (["--loss.alpha", "1.5"], "loss.alpha = 1.5"),
    (["--loss.name", "ppo"], "loss.name = 'ppo'"),
    (["--kernel.impl", "cuda"], "kernel.impl = 'cuda'"),
    (["--kernel.chunk_size", "big"], "kernel.chunk_size = 'big'"),
    (["--kernel.block_v", "100"], "kernel.block_v = 100"),
    (["--train.lr", "nan"], "train.lr = nan; must be a finite number > 0"),
    (["--train.lr", "inf"], "train.lr = inf"),
    (["--train.adam_eps", "-inf"], "train.adam_eps = -inf"),
    (["--train.grad_clip", "nan"], "train.grad_clip = nan"),
    (["--train.save_every", "-1"], "train.save_every = -1; must be >= 0"),
    (["--train.keep_checkpoints", "-2"], "train.keep_checkpoints = -2"),
    (["--train.max_nonfinite_steps", "0"], "max_nonfinite_steps"),
    (["--run.resume", "/no/such/checkpoint"], "run.resume = '/no/such/checkpoint': not a checkpoint folder"),
    (["--deepspeed.config", "zero9"], "deepspeed.config: 'zero9' is neither a .json file nor one of zero2, zero3"),
    (["--deepspeed.config", "/no/such.json"], "deepspeed.config: '/no/such.json': no such file"),
    (["--eval.samples", "0"], "eval: samples must be >= 1"),
    (["--train.lr", "--loss.alpha", "0.5"], "override --train.lr has no value"),
    (["--train.global_batch_size", "10", "--train.micro_batch_size", "4"], "not a multiple"),
    (["--model.gradient_checkpointing", "yes please"], "expected true/false"),
    (["--train"], "has no value"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", stage="redi", overrides=overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_stage_and_file(tmp_path):
    with pytest.raises(ConfigError, match="no stage 'ppo'"):
        load_config("tiny", stage="ppo")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-5\n  batch: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("data: {path: x.jsonl}\ntrain: {learning_rate: 1.0}\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'train.learning_rate'"):
        load_config(str(unknown))


def test_batch_sizes_checked_against_world_size():
    cfg = load_config("tiny", stage="sft", overrides=["--train.global_batch_size", "16",
                                                      "--train.micro_batch_size", "4"])
    assert grad_accum_steps(cfg, 1) == 4 and grad_accum_steps(cfg, 2) == 2 and grad_accum_steps(cfg, 4) == 1
    with pytest.raises(ConfigError, match=r"not divisible by train.micro_batch_size \(4\) x world size \(3\)"):
        grad_accum_steps(cfg, 3)


def test_cli_reports_config_error_before_compute():
    r = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--stage", "redi", "--loss.alhpa", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "unknown key 'loss.alhpa'" in r.stderr and "Traceback" not in r.stderr


def test_each_loss_owns_its_section():
    """The `loss` section is the chosen loss's own dataclass: its options only, checked by it; another name starts
    from that loss's defaults (the options below it belong to another loss); its tags come from it."""
    from redi_ds.losses import loss_tags
    from redi_ds.losses.dpo import DPOConfig
    from redi_ds.losses.redi import REDIConfig

    redi = load_config("tiny", stage="redi", overrides=["--loss.alpha", "0.5"])
    assert isinstance(redi.loss, REDIConfig) and redi.loss.alpha == 0.5
    dpo = load_config("tiny", stage="redi", overrides=["--loss.name", "dpo", "--loss.beta", "0.2"])
    assert isinstance(dpo.loss, DPOConfig) and dpo.loss.beta == 0.2 and not hasattr(dpo.loss, "alpha")
    assert loss_tags(dpo.loss) == {"loss": "dpo", "beta": "0.2"}
    either_order = load_config("tiny", stage="redi", settings={"loss.beta": 0.3, "loss.name": "dpo"})
    assert either_order.loss == DPOConfig(beta=0.3)
    assert loss_tags(redi.loss) == {"loss": "redi", "alpha": "0.5", "negative_span": "all"}
    assert load_config("tiny", stage="sft").to_dict()["loss"] == {"name": "sft"}
    cases = {("--loss.beta", "0.1"): "unknown key 'loss.beta'",  # redi has no beta
             ("--loss.alpha", "1.5"): "loss.alpha = 1.5; REDI's alpha lies in [0, 1]",
             ("--loss.name", "dpo", "--loss.beta", "0"): "loss.beta = 0.0; DPO's beta must be > 0",
             ("--loss.name", "dpo", "--loss.beta", "-0.1"): "DPO's beta must be > 0",
             ("--loss.name", "simpo", "--loss.gamma", ".nan"): "loss.gamma = nan; must be a finite number",
             ("--loss.name", "simpo", "--loss.beta", "inf"): "loss.beta = inf; must be a finite number",
             ("--loss.name", "ppo"): "loss.name = 'ppo'; expected one of distill, dpo, redi, sft, simpo",
             ("--loss.negative_span", "some"): "loss.negative_span = 'some'; expected all or divergent"}
    for args, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            load_config("tiny", stage="redi", overrides=list(args))
