"""redi_ds.kernels: per-sequence log-probs (and linear losses) straight from hidden states and the LM head.

A subpackage that imports nothing of redi_ds above it (no trainer, config, loss or model); the microbenchmarks
live outside the package, in the checkout's top-level ``kernels/`` folder (scripts, no ``__init__.py``).
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
from redi_ds.kernels.fused import fused_linear_loss, fused_sequence_logprobs, fused_token_logprobs
from redi_ds.kernels.options import FusedHeadOptions
from redi_ds.kernels.transform import IDENTITY, LogitTransform

__all__ = [
    "FusedHeadOptions",
    "IDENTITY",
    "LogitTransform",
    "IGNORE_INDEX",
    "fused_linear_loss",
    "fused_sequence_logprobs",
    "fused_token_logprobs",
    "reference_sequence_logprobs",
    "reference_token_logprobs",
    "sequence_logprobs_from_logits",
]
