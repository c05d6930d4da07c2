"""What a step trains on and at which rate: the optimizer, the LR schedule, the data order, the precision.

The data order is a function of (seed, epoch) only: step ``s`` always reads the same examples, so a resumed run
sees exactly what the uninterrupted one saw.
"""

from __future__ import annotations

import math

import torch

from redi_ds.config import Config


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def make_optimizer(model: torch.nn.Module, cfg: Config, offload: bool):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return f


def step_indices(n: int, global_batch: int, seed: int, step: int, shuffle: bool) -> list[int]:
    """The ``global_batch`` example indices of optimizer step ``step`` (epochs drop their remainder)."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    return order[k * global_batch:(k + 1) * global_batch]
