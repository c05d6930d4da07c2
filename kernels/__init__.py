"""redi_ds.kernels: per-sequence log-probs and the REDI loss straight from hidden states and the LM head.

Installed as ``redi_ds.kernels`` (setup.py maps this folder); never import it as a top-level ``kernels``.
Triton is imported only when ``impl="triton"`` is used.
"""

from redi_ds.kernels.reference import (
    IGNORE_INDEX,
    reference_redi_loss,
    reference_sequence_logprobs,
    sequence_logprobs_from_logits,
)
from redi_ds.kernels.fused import fused_linear_loss, fused_redi_loss, fused_sequence_logprobs, redi_coefficients
from redi_ds.kernels.options import FusedHeadOptions

__all__ = [
    "FusedHeadOptions",
    "IGNORE_INDEX",
    "fused_linear_loss",
    "fused_redi_loss",
    "fused_sequence_logprobs",
    "redi_coefficients",
    "reference_redi_loss",
    "reference_sequence_logprobs",
    "sequence_logprobs_from_logits",
]
