"""Validation of a resolved Config: every value a user can get wrong, as one line naming the key, before any data
is loaded or any process group starts (``redi_ds.config.load_config`` calls ``validate``)."""

from __future__ import annotations

import math
from pathlib import Path

from redi_ds.config import Config, EvalConfig, TrainConfig
from redi_ds.errors import ConfigError
from redi_ds.losses import LOSSES

_CHOICES = {
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.liger": ("auto", "on", "off"),
    "train.schedule": ("linear", "cosine", "constant"),
    "deepspeed.precision": ("auto", "bf16", "fp16", "fp32"),
    "data.format": ("auto", "plain", "messages"),
    "data.train_on": ("all", "last_turn"),
    "rollout.backend": ("hf", "vllm", "auto"),
}


def validate(cfg: Config, source: str = "config") -> None:
    """Every value a user can get wrong, as one line naming the key, before any data or process group."""
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            fail(f"{dotted} = {value!r}; expected one of {', '.join(choices)}")
    _check_train(cfg.train, fail)
    _check_data_and_model(cfg, fail)
    _check_eval(cfg.eval, fail)
    _check_distill(cfg, fail)
    if cfg.deepspeed.sequence_parallel_size < 1:
        fail(f"deepspeed.sequence_parallel_size = {cfg.deepspeed.sequence_parallel_size}; must be >= 1")
    if cfg.deepspeed.sequence_parallel_size > 1 and cfg.model.attn_implementation == "eager":
        fail("model.attn_implementation: eager cannot run under sequence parallelism (Ulysses drops the 4D mask "
             "eager needs); use auto, sdpa or flash_attention_2")
    r = cfg.run.resume
    if r not in ("auto", "never") and not (Path(r).is_dir() and Path(r).parent.is_dir()):
        fail(f"run.resume = {r!r}: not a checkpoint folder (expected auto, never, or a folder such as "
             f"runs/NAME/STAGE/checkpoints/step_N)")
    from redi_ds import ds_config  # light: finds the JSON (bundled or a path); its ZeRO keys are checked later

    try:
        ds_config.locate(cfg.deepspeed.config)
    except ConfigError as e:
        fail(str(e))


def _check_train(t: TrainConfig, fail) -> None:
    for name, value, low in (("lr", t.lr, "> 0"), ("adam_eps", t.adam_eps, "> 0"), ("grad_clip", t.grad_clip, ">= 0"),
                             ("weight_decay", t.weight_decay, ">= 0"), ("min_lr_ratio", t.min_lr_ratio, ">= 0")):
        if not math.isfinite(value) or (value <= 0 if low == "> 0" else value < 0):
            fail(f"train.{name} = {value}; must be a finite number {low}")
    if t.min_lr_ratio > 1:
        fail(f"train.min_lr_ratio = {t.min_lr_ratio}; must be in [0, 1] (a fraction of train.lr)")
    for name in ("save_every", "keep_checkpoints", "stop_after_steps", "max_steps", "epochs"):
        if getattr(t, name) < 0:
            fail(f"train.{name} = {getattr(t, name)}; must be >= 0")
    if t.max_nonfinite_steps < 1 or t.log_every < 1:
        fail("train.max_nonfinite_steps and train.log_every must be >= 1")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        fail(f"train.adam_betas = {t.adam_betas}; two values, each in [0, 1)")
    if not 0.0 <= t.warmup_ratio < 1.0:
        fail(f"train.warmup_ratio = {t.warmup_ratio}; must be in [0, 1)")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        fail("train.micro_batch_size and train.global_batch_size must be >= 1")
    if t.global_batch_size % t.micro_batch_size:
        fail(f"train.global_batch_size ({t.global_batch_size}) is not a multiple of "
             f"train.micro_batch_size ({t.micro_batch_size})")
    if t.epochs < 1 and t.max_steps < 1:
        fail("train.epochs or train.max_steps must be >= 1")


def _check_data_and_model(cfg: Config, fail) -> None:
    d, m = cfg.data, cfg.model
    if not d.path:
        fail("data.path is empty")
    if d.max_prompt_length < 1 or d.max_length <= d.max_prompt_length:
        fail(f"data.max_length ({d.max_length}) must exceed data.max_prompt_length ({d.max_prompt_length})")
    if d.limit < 0 or d.synthetic_size < 1:
        fail(f"data.limit = {d.limit} must be >= 0 and data.synthetic_size = {d.synthetic_size} >= 1")
    if m.rope_theta is not None and not (math.isfinite(m.rope_theta) and m.rope_theta > 0):
        fail(f"model.rope_theta = {m.rope_theta}; must be a finite number > 0")
    positions = m.max_position_embeddings or (m.tiny.max_position_embeddings if m.name_or_path == "tiny" else None)
    if positions is not None and positions < d.max_length:
        key = "model.max_position_embeddings" if m.max_position_embeddings else "model.tiny.max_position_embeddings"
        fail(f"{key} = {positions} is below data.max_length = {d.max_length}")
    t = m.tiny
    sizes = {k: getattr(t, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size")}
    bad = [f"{k} = {v}" for k, v in sizes.items() if v < 1]
    if bad:
        fail(f"model.tiny.{bad[0]}; sizes must be >= 1")
    if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
        fail(f"model.tiny: num_attention_heads ({t.num_attention_heads}) must divide hidden_size ({t.hidden_size}) "
             f"and num_key_value_heads ({t.num_key_value_heads}) must divide num_attention_heads")
    if not (math.isfinite(t.rope_theta) and t.rope_theta > 0):
        fail(f"model.tiny.rope_theta = {t.rope_theta}; must be a finite number > 0")
    lo = m.lora
    if lo.r < 0 or not (math.isfinite(lo.alpha) and lo.alpha > 0) or not 0 <= lo.dropout < 1 or not lo.target_modules:
        fail(f"model.lora: r = {lo.r} must be >= 0 (0: off), alpha = {lo.alpha} > 0, dropout = {lo.dropout} in "
             f"[0, 1), target_modules non-empty")


def _check_distill(cfg: Config, fail) -> None:
    if not LOSSES[cfg.loss.name].needs_teacher:
        return
    r = cfg.rollout
    if not cfg.teacher.name_or_path:
        fail("teacher.name_or_path is empty: the distill stage needs a teacher (a hub name, a folder, @stage, tiny)")
    if r.samples < 1 or r.max_new_tokens < 1 or r.log_every < 1:
        fail(f"rollout.samples ({r.samples}), rollout.max_new_tokens ({r.max_new_tokens}) and rollout.log_every "
             f"({r.log_every}) must be >= 1")
    if not (0 <= r.temperature < float("inf") and 0 < r.top_p <= 1 and 0 < r.gpu_memory_utilization < 1):
        fail("rollout: need a finite temperature >= 0, 0 < top_p <= 1 and 0 < gpu_memory_utilization < 1")
    if cfg.deepspeed.sequence_parallel_size > 1:
        fail("the distill stage does not run under sequence parallelism (its rollouts are whole sequences); set "
             "deepspeed.sequence_parallel_size: 1")


def _check_eval(e: EvalConfig, fail) -> None:
    from redi_ds.eval.errors import EvalError

    if e.heldout_every < 0 or (e.heldout_every and not e.heldout_pairs):
        fail("eval.heldout_every needs eval.heldout_pairs (a JSONL of prompt, chosen, rejected) and must be >= 0")
    try:
        e.check()
        if e.benchmarks:  # names and backend now, not after training and export
            from redi_ds.eval.backends import check_backend_name
            from redi_ds.eval.benchmarks import resolve_benchmarks

            resolve_benchmarks(e.benchmarks)
            check_backend_name(e.backend)
    except EvalError as err:
        fail(f"eval: {err}")
