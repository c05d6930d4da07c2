"""What a model does to its logits after the LM head, as the fused head computes it (exact in value and gradient).

Math (z = W h + b, the head's output; s = ``scale``, c = ``softcap``):

    z' = s z                                    no softcap   dz'/dz = s
    z' = c tanh(s z / c)                        softcap c     dz'/dz = s (1 - tanh^2(s z / c))
    logp_t = z'_t[y_t] - logsumexp(z'_t)        d(-logp)/dz = (softmax(z') - onehot(y)) * dz'/dz   (elementwise)

Divisors are a scale of 1/d (Granite's ``logits_scaling``); Gemma2/3's ``final_logit_softcapping`` is the softcap;
Cohere's ``logit_scale`` and Falcon-H1's ``lm_head_multiplier`` are scales. The row ops (torch twin, Triton kernel)
apply it to every vocabulary block before the logsumexp and fold dz'/dz into G, so the matmuls are unchanged; the
reference applies it to the full logits with torch ops. Which model has which transform lives in one table,
``redi_ds.families``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogitTransform:
    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"logit scale = {self.scale}; must be a finite number > 0")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"logit softcap = {self.softcap}; must be a finite number > 0 (or None)")

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, z: Tensor) -> Tensor:
        """z' of full logits (the reference path; differentiable with torch ops)."""
        if self.softcap is not None:
            return self.softcap * torch.tanh(z * (self.scale / self.softcap))
        return z * self.scale if self.scale != 1.0 else z

    def __str__(self) -> str:
        parts = ([f"x {self.scale:g}"] if self.scale != 1.0 else []) + \
            ([f"softcap {self.softcap:g}"] if self.softcap is not None else [])
        return ", ".join(parts) or "none"


IDENTITY = LogitTransform()
