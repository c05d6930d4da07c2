"""redi_ds.kernels: per-sequence log-probs (and linear losses) straight from hidden states and the LM head.

Installed as ``redi_ds.kernels`` (setup.py maps this folder); never import it as a top-level ``kernels``.
Triton is imported only when ``impl="triton"`` is used. The kernels know no loss by name: they return
per-sequence log-prob sums and counts, and ``sum_t c_t logp_t`` for coefficients a loss module gives
(``redi_ds.losses`` owns the SFT / REDI / DPO / SimPO formulas).
"""

from redi_ds.kernels.reference import (
    IGNORE_INDEX,
    reference_sequence_logprobs,
    reference_token_logprobs,
    sequence_logprobs_from_logits,
)
from redi_ds.kernels.fused import fused_linear_loss, fused_sequence_logprobs
from redi_ds.kernels.options import FusedHeadOptions

__all__ = [
    "FusedHeadOptions",
    "IGNORE_INDEX",
    "fused_linear_loss",
    "fused_sequence_logprobs",
    "reference_sequence_logprobs",
    "reference_token_logprobs",
    "sequence_logprobs_from_logits",
]
