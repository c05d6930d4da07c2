"""Options of the fused LM-head log-prob kernels, in one frozen dataclass (cut-cross-entropy style).

Nothing here imports triton; ``resolve_impl`` only asks whether it *could* be imported when the
tensors live on CUDA.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class FusedHeadOptions:
    """How the fused head runs. Every field has a default that suits the trainer.

    impl: "triton" (Triton row kernel + cuBLAS matmuls), "torch" (the chunked PyTorch twin of the same
        algorithm; the CPU path) or "auto" (triton for CUDA tensors when triton imports, torch elsewhere).
    chunk_size: tokens per block. The only [block x V] buffer lives for one block, so this sets the memory:
        block x V x (2 bytes bf16 on the triton path; 4 bytes fp32 on the torch path). 1024 x 151,936 bf16
        is 311 MB. Smaller blocks cost little speed as long as the matmuls stay large (>= 256 tokens).
    block_v: vocabulary tile of the Triton row kernel (a power of two; clipped to next_pow2(V)). Tests use
        a small tile to exercise the multi-tile online softmax.
    num_warps: Triton warps per row program (None: 32 for big tiles, fewer for small).
    fp32_weight_grad: accumulate d(weight) across blocks in an fp32 buffer when the weight is bf16/fp16
        (one extra V x H fp32 buffer: 933 MB for Qwen-1.5B's head). Default False: accumulate in the
        weight dtype with addmm (fp32 inside each block's matmul, one rounding per block), as Liger does.
    """

    impl: str = "auto"
    chunk_size: int = 1024
    block_v: int = 32768
    num_warps: int | None = None
    fp32_weight_grad: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {self.block_v}")

    def with_(self, **kw) -> "FusedHeadOptions":
        return replace(self, **kw)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, is_cuda: bool) -> str:
    """'auto' -> 'triton' on CUDA (when triton is installed), 'torch' elsewhere."""
    if impl == "auto":
        return "triton" if is_cuda and triton_available() else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl
