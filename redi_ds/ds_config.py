"""The DeepSpeed JSON: ZeRO and precision from ``ds_configs/*.json``; everything else from our config.

The bundled files are package data of ``redi_ds`` (``redi_ds/ds_configs/*.json``, read through
``importlib.resources``; the top-level ``ds_configs`` of a checkout links there), so a regular, non-editable
install finds them.
``deepspeed.config`` names one of them (``zero3``, ``zero2``, ``zero3_offload``) or a JSON file of your own.
Batch sizes, accumulation, clipping, optimizer and schedule live in our config, never in the JSON: a JSON
that sets them is a one-line error. ``deepspeed.zero`` entries are merged into ``zero_optimization`` and,
with it, validated against DeepSpeed's own schema before any process group starts.
"""

from __future__ import annotations

import json
import os
from importlib import resources

from redi_ds.errors import ConfigError

# set from our config (train.*, deepspeed.precision): a JSON that sets them would silently disagree
OURS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (micro x world)",
    "gradient_clipping": "train.grad_clip",
    "sequence_parallel_size": "deepspeed.sequence_parallel_size",
    "optimizer": "train.lr, train.adam_betas, train.adam_eps, train.weight_decay",
    "scheduler": "train.schedule, train.warmup_ratio",
}


def _bundled():
    return resources.files("redi_ds").joinpath("ds_configs")


def bundled_names() -> list[str]:
    return sorted(p.name[:-5] for p in _bundled().iterdir() if p.name.endswith(".json"))


def locate(name: str) -> tuple[str, str]:
    """(label, JSON text) of a bundled name or a .json path; ConfigError when neither exists."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise ConfigError(f"deepspeed.config: {name!r}: no such file")
        with open(name, "rb") as f:
            data = f.read()
        label = name
    else:
        res = _bundled().joinpath(f"{name}.json")
        if not res.is_file():
            raise ConfigError(f"deepspeed.config: {name!r} is neither a .json file nor one of "
                              f"{', '.join(bundled_names())}")
        label, data = f"ds_configs/{name}.json", res.read_bytes()
    try:
        return label, data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{label}:{line}: not UTF-8 (byte {data[e.start]:#04x})") from None


def _no_duplicate_keys(label: str):
    def hook(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise ConfigError(f"{label}: duplicate key {dup!r} in the DeepSpeed JSON; a second value would win")
        return dict(pairs)
    return hook


def load(ds_cfg) -> dict:
    """The JSON of ``ds_cfg.config`` with ``ds_cfg.zero`` merged into zero_optimization (not yet validated)."""
    label, text = locate(ds_cfg.config)
    try:
        ds = json.loads(text, object_pairs_hook=_no_duplicate_keys(label))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{label}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise ConfigError(f"{label}: JSON nested too deeply") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{label}: the top level must be an object")
    for key, where in OURS.items():
        if key in ds:
            raise ConfigError(f"{label}: {key!r} is set by our config ({where}), not in the DeepSpeed JSON")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{label}: 'zero_optimization' must be an object")
    ds["zero_optimization"] = {**zero, **ds_cfg.zero}
    return ds


def validate_zero(ds: dict, label: str = "deepspeed") -> None:
    """DeepSpeed's own schema for zero_optimization, as a one-line error (imports deepspeed: seconds)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**ds["zero_optimization"])
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "zero_optimization"
        raise ConfigError(f"{label}: deepspeed.zero / zero_optimization.{key}: {err['msg']} "
                          f"(got {err.get('input')!r})") from None


def gradient_average_size(ds: dict, world: int) -> int:
    """How many ranks DeepSpeed (0.19) averages each gradient over, for ``train_step`` to undo.

    Without sequence parallelism: the world. With N-way SP the ranks of an SP group hold parts of the same
    sequences, so their gradients must be summed and only the data-parallel copies averaged. ZeRO 0-2 do that
    (they divide by world / N: stage_1_and_2.py, engine.allreduce_bucket). ZeRO-3's default coalesced
    reduce-scatter (``stage3.__avg_scatter_grads``) averages over the whole world; its other path (contiguous
    buckets, ``reduce_scatter: false``) divides by world / N, per bucket, so ``check_sequence_parallel`` refuses
    that setting. Measured by tests/test_parallel.py (grad norms of SP 2 against one rank, ZeRO-2 and ZeRO-3).
    """
    n = int(ds.get("sequence_parallel_size", 1))
    return world if n == 1 or ds["zero_optimization"].get("stage", 0) == 3 else world // n


def check_sequence_parallel(ds: dict, label: str = "deepspeed") -> None:
    zero = ds["zero_optimization"]
    if int(ds.get("sequence_parallel_size", 1)) > 1 and zero.get("stage", 0) == 3 \
            and not zero.get("reduce_scatter", True):
        raise ConfigError(f"{label}: deepspeed.zero.reduce_scatter = false with sequence_parallel_size > 1: "
                          "DeepSpeed 0.19's ZeRO-3 then scales gradients by bucket inconsistently; keep it true")


def build(cfg, accum: int, precision: str) -> dict:
    """The dict for ``deepspeed.initialize``: the JSON's ZeRO settings + batch sizes, clipping, precision."""
    ds = load(cfg.deepspeed)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {"initial_scale_power": 16, **ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds.update({
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    if cfg.deepspeed.sequence_parallel_size > 1:
        ds["sequence_parallel_size"] = cfg.deepspeed.sequence_parallel_size
    if "offload_optimizer" not in ds["zero_optimization"]:
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds
