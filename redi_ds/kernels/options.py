"""Options of the fused LM-head kernels, in one frozen dataclass (cut-cross-entropy style).

The same dataclass is the ``kernel`` section of the training config (``redi_ds.config``), so there is one
options type from the YAML file to the kernel. Nothing here imports triton; ``resolve_impl`` only asks
whether it *could* be imported when the tensors live on CUDA.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

IMPLS = ("auto", "torch", "triton", "reference")

# chunk_size "auto": the [chunk, V] block buffer may use this many bytes (see FusedHeadOptions.chunk_for)
BLOCK_BYTES = {"cuda": 256 * 2**20, "cpu": 128 * 2**20}
CHUNK_MIN, CHUNK_MAX, CHUNK_ALIGN = 64, 16384, 64


@dataclass(frozen=True)
class FusedHeadOptions:
    """How the fused head runs. Every field has a default that suits the trainer.

    impl: "triton" (Triton row kernel + cuBLAS matmuls), "torch" (the chunked PyTorch twin of the same
        algorithm; the CPU path), "reference" (the unfused logits path: the test oracle, materialises
        [tokens x V]) or "auto" (triton for CUDA tensors when triton imports, torch elsewhere).
    chunk_size: tokens per block, or "auto". The only [block x V] buffer lives for one block, so this sets
        the working memory: block x V x bytes per logit (the weight dtype on the triton path; fp32 on the
        torch path, plus the weight-dtype matmul output when that is not fp32). "auto" picks
        ``floor(budget / (V x bytes per logit))`` rounded down to a multiple of 64 and clipped to
        [64, 16384], with a budget of 256 MiB on CUDA and 128 MiB on CPU: 832 tokens for Qwen's
        V = 151,936 in bf16 on a GPU, 192 on a CPU in fp32 (220 rounded down); up to 16,384 tokens a block
        for a small vocabulary. Measured on CPU (kernels/BENCHMARKS.md): 192 runs as fast as 256 or 1024
        while its block is a fifth of 1024's; below ~128 the matmuls get too small and time grows.
    block_v: vocabulary tile of the Triton row kernel (a power of two; clipped to next_pow2(V)). Tests use
        a small tile to exercise the multi-tile online softmax.
    num_warps: Triton warps per row program (None: 32 for big tiles, fewer for small).
    fp32_weight_grad: accumulate d(weight) across blocks in an fp32 buffer when the weight is bf16/fp16
        (one extra V x H fp32 buffer: 933 MB for Qwen-1.5B's head). Default False: accumulate in the
        weight dtype with addmm (fp32 inside each block's matmul, one rounding per block), as Liger does.
    """

    impl: str = "auto"
    chunk_size: Union[int, str] = "auto"
    block_v: int = 32768
    num_warps: Optional[int] = None
    fp32_weight_grad: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl = {self.impl!r}; expected one of {', '.join(IMPLS)}")
        if self.chunk_size != "auto" and (not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool)
                                          or self.chunk_size < 1):
            raise ValueError(f"chunk_size = {self.chunk_size!r}; expected 'auto' or an integer >= 1")
        if not isinstance(self.block_v, int) or self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v = {self.block_v}; expected a power of two >= 16")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps = {self.num_warps}; expected null or a power of two in [1, 32]")

    def with_(self, **kw) -> "FusedHeadOptions":
        return replace(self, **kw)

    def chunk_for(self, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        """Tokens per block for a [V, H] head of this dtype on this device (resolves "auto")."""
        if self.chunk_size != "auto":
            return int(self.chunk_size)
        impl = resolve_impl(self.impl, device.type == "cuda")
        elem = torch.empty((), dtype=dtype).element_size()
        per_logit = elem if impl == "triton" else 4 + (0 if dtype == torch.float32 else elem)
        budget = BLOCK_BYTES["cuda" if device.type == "cuda" else "cpu"]
        rows = budget // max(1, vocab * per_logit)
        return max(CHUNK_MIN, min(CHUNK_MAX, rows // CHUNK_ALIGN * CHUNK_ALIGN))


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, is_cuda: bool) -> str:
    """'auto' -> 'triton' on CUDA (when triton is installed), 'torch' elsewhere; others as given."""
    if impl == "auto":
        return "triton" if is_cuda and triton_available() else "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl
