"""On-policy distillation: the student samples, the teacher scores every sampled token (redi_ds.rollout).

With the sampled-token estimator of the reverse KL, the loss is linear in the student's token log-probs:

    L = -(kl_coef / N) sum_t A_t log p_S(y_t),    A_t = log p_T(y_t) - log p_S^old(y_t)   (detached; y ~ p_S)

N = the sampled tokens of the whole optimizer step (all ranks). p_S^old is the student when it sampled: with one
update per batch of samples, the student itself (its no-grad log-probs, from the fused head). Its gradient is the
policy gradient of -KL(p_S || p_T) with the per-token reward A_t: it pushes the student toward the teacher on the
student's own states. A_t is known before the training pass, so the fused head's single pass with per-token
coefficients applies, at any length, without logits.

``mix`` adds, on the same step and in the same pass, the SFT loss on the prompts' data responses (``mix: sft``) or
the REDI loss on their (chosen, rejected) pairs (``mix: redi``, which reads pairs), weighted by ``mix_coef``; each
keeps its own normalisation (SFT: a token mean over the step; REDI: a mean over the step's pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from redi_ds.losses.base import LossConfig, SequenceLoss, StepTotals, finite, register_loss

MIXES = ("none", "sft", "redi")


@dataclass
class DistillConfig(LossConfig):
    name: str = "distill"
    kl_coef: float = 1.0  # weight of the reverse-KL term
    mix: str = "none"  # none | sft | redi: a second loss on the prompts' own data, in the same pass
    mix_coef: float = 0.0
    mix_alpha: float = 0.8  # REDI's alpha when mix is redi

    def __post_init__(self):
        finite("loss", kl_coef=self.kl_coef, mix_coef=self.mix_coef, mix_alpha=self.mix_alpha)
        if self.mix not in MIXES:
            raise ValueError(f"loss.mix = {self.mix!r}; expected one of {', '.join(MIXES)}")
        if self.kl_coef < 0 or self.mix_coef < 0 or not 0 <= self.mix_alpha <= 1:
            raise ValueError(f"loss: kl_coef ({self.kl_coef}) and mix_coef ({self.mix_coef}) must be >= 0 and "
                             f"mix_alpha ({self.mix_alpha}) in [0, 1]")


def kl_coefficients(advantages: Tensor, sampled_tokens: int, kl_coef: float) -> Tensor:
    """Per sampled token: d(loss) / d(log p_S(y_t)) = -kl_coef A_t / N (the formula of the module doc)."""
    return -kl_coef * advantages.to(torch.float64) / max(1, sampled_tokens)


@register_loss
class DistillLoss(SequenceLoss):
    name = "distill"
    Config = DistillConfig
    linear = True
    needs_teacher = True

    def __init__(self, kl_coef: float = 1.0, mix: str = "none", mix_coef: float = 0.0, mix_alpha: float = 0.8):
        super().__init__()
        DistillConfig(kl_coef=kl_coef, mix=mix, mix_coef=mix_coef, mix_alpha=mix_alpha)
        self.kl_coef, self.mix, self.mix_coef, self.mix_alpha = kl_coef, mix, mix_coef, mix_alpha
        self.paired = mix == "redi"  # the prompts (and the mixed loss's data) come from pairs

    @classmethod
    def from_config(cls, loss_cfg):
        return cls(loss_cfg.kl_coef, loss_cfg.mix, loss_cfg.mix_coef, loss_cfg.mix_alpha)

    def token_coefficients(self, batch: dict, totals: StepTotals) -> Tensor:
        """Built with the batch by redi_ds.rollout (sampled tokens and, with a mix, the data's): per position."""
        return batch["token_coeffs"]

    def mixed(self) -> SequenceLoss:
        """The loss on the prompts' own data (SFT or REDI), whose coefficients the rollout lays out."""
        from redi_ds.losses.redi import REDILoss
        from redi_ds.losses.sft import SFTLoss

        return REDILoss(alpha=self.mix_alpha) if self.mix == "redi" else SFTLoss()
