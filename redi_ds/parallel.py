"""Sequence parallelism for long traces: DeepSpeed's Ulysses (ALST) with the fused head on shards.

    world = N (``deepspeed.sequence_parallel_size``) x D (data parallel); SP group g = ranks [g N, (g+1) N)

- **Groups and attention.** ``setup`` registers DeepSpeed's ``UlyssesSPAttentionHF`` with transformers
  (``deepspeed.runtime.sequence_parallel.ulysses_sp``): inside every attention layer an all-to-all turns
  "all heads, my 1/N of the tokens" into "1/N of the heads, all tokens", the core attention runs on the
  whole sequence, and a second all-to-all turns it back. It returns DeepSpeed's ``parallel_state_sp``
  groups, which ``deepspeed.initialize(mpu=...)`` uses: ZeRO-3 partitions over the whole world as before.
  The SP group's gradients must be summed and the data-parallel copies averaged; DeepSpeed's reduction
  averages over the world (ZeRO-3) or over data parallel (ZeRO 0-2), and ``train_step`` scales the loss
  by what applies (``redi_ds.ds_config.gradient_average_size``).
- **Packing stays exact.** Ulysses drops the 4D attention mask and all-gathers ``position_ids``; packing is
  left to the core attention. flash-attention turns the gathered positions into varlen ``cu_seqlens`` (GPU).
  On CPU ``packed_sdpa`` (registered as ``redi_packed_sdpa``) splits the row where the gathered positions
  restart at 0 and runs one causal sdpa call per sequence: exact, and no [T, T] mask is built. Plain ``sdpa``
  would let a rejected trace attend to its chosen one in a packed row, silently (``tests/test_parallel.py``).
- **Sharding.** Every rank of an SP group collates the same micro batch; ``shard`` pads its rows to a multiple
  of N (pad tokens, ignored targets, positions counting on) and keeps its contiguous 1/N of every row:
  ``input_ids``, ``position_ids``, ``targets``, ``seq_ids`` and the span mask. The targets were shifted on the
  whole row, so the last token of one shard predicts the first token of the next. ``counts`` stay global.
- **The head on shards.** Each rank runs the fused head on its own hidden states only and gets per-sequence
  partial sums. A linear loss (SFT, REDI) takes its coefficients from the global counts, so its single pass
  stays single and each rank's share is its part of the micro batch's share; the sums are all-reduced over
  the SP group for the metrics only. A non-linear loss (DPO, SimPO) gets the all-reduced sums in forward
  (``all_reduce_sums``, differentiable: backward hands each rank the per-sequence gradient) and each rank
  passes 1/N of the share, so that the SP group together passes the share once.
- **No-grad passes and evaluation** (DPO's reference pass, the held-out probe, generation) run with SP off:
  Ulysses is registered with ``disable_in_eval``, and the model sees whole sequences in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from redi_ds.kernels.reference import IGNORE_INDEX

PACKED_SDPA = "redi_packed_sdpa"
SHARDED = ("input_ids", "position_ids", "targets", "seq_ids", "span_mask")


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """Causal attention within each sequence of a packed row, from the (gathered) ``position_ids``: a position 0
    starts a new sequence. Each sequence is one causal sdpa call (no mask: PyTorch's memory-efficient kernels),
    so no [T, T] mask is ever built; a token never attends to another sequence's tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.pop("position_ids", None)
    if pos is None:
        raise ValueError(f"{PACKED_SDPA} needs position_ids")
    t = query.shape[2]
    pos = pos[:, -t:] if pos.shape[-1] != t else pos
    if pos.shape[0] != query.shape[0]:
        pos = pos.expand(query.shape[0], -1)
    rows = []
    for r in range(query.shape[0]):  # [B, heads, T, D] -> per row, per sequence
        starts = (pos[r] == 0).nonzero().flatten().tolist()
        bounds = sorted(set([0] + starts)) + [t]
        parts = [sdpa_attention_forward(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b],
                                        value[r:r + 1, :, a:b], None, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)[0]
                 for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        rows.append(torch.cat(parts, dim=1))  # [1, T, heads, D]
    return torch.cat(rows, dim=0), None


def register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


@dataclass
class SequenceParallel:
    size: int      # N
    rank: int      # this rank's place in its SP group
    group: object  # the SP process group
    mpu: object    # DeepSpeed's parallel_state_sp (for deepspeed.initialize)
    pad_id: int

    # --------------------------------------------------------------------------- data
    def shard(self, batch: dict) -> dict:
        """This rank's contiguous 1/N of every row (rows padded to a multiple of N); counts stay global."""
        t = batch["input_ids"].shape[-1]
        width = -(-t // self.size) * self.size
        lo, hi = self.rank * width // self.size, (self.rank + 1) * width // self.size
        out = dict(batch)
        for key in SHARDED:
            x = batch.get(key)
            if x is None:
                continue
            if width > t:
                x = _pad(x, key, width - t, self.pad_id)
            out[key] = x[..., lo:hi].contiguous()
        out["attention_mask"] = None  # Ulysses drops it; causality and packing come from position_ids
        return out

    # --------------------------------------------------------------------------- reductions
    def all_reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums over the SP group, differentiable (backward: the same all-reduce of gradients)."""
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(sums, group=self.group)

    def all_reduce_detached(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x, group=self.group)
        return x


def _pad(x: torch.Tensor, key: str, n: int, pad_id: int) -> torch.Tensor:
    if key == "position_ids":  # counting on from each row's last position: causal, after every real token
        last = x[..., -1:]
        return torch.cat([x, last + torch.arange(1, n + 1, device=x.device)], dim=-1)
    if key == "seq_ids":
        return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], n)], dim=-1)
    value = {"input_ids": pad_id, "targets": IGNORE_INDEX, "span_mask": False}[key]
    return F.pad(x, (0, n), value=value)


def setup(hf_model, size: int, rows_per_forward: int, pad_id: int) -> Optional[SequenceParallel]:
    """Register DeepSpeed's Ulysses attention for ``hf_model`` (N = ``size``; None when 1) and build the groups.

    ``rows_per_forward`` is the batch dimension every forward has (Ulysses fixes it): 1 for a packed row, the
    number of sequences of a padded micro batch. The core attention is the model's: flash-attention (GPU, packing
    from cu_seqlens) or ``redi_packed_sdpa`` (the model's sdpa is switched to it: packing from the mask).
    """
    if size <= 1:
        return None
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from redi_ds.errors import ConfigError

    heads = hf_model.config.num_attention_heads
    kv = getattr(hf_model.config, "num_key_value_heads", None) or heads
    if heads % size or (kv % size and size % kv):  # Ulysses splits the heads over the SP group
        raise ConfigError(f"deepspeed.sequence_parallel_size = {size}: the model's {heads} attention heads "
                          f"({kv} key/value heads) do not split over {size} ranks; choose a divisor of {heads}")
    core = hf_model.config._attn_implementation
    if core == "eager":  # Ulysses drops the 4D mask eager needs: it would attend across sequences and the future
        raise ConfigError(f"deepspeed.sequence_parallel_size = {size}: the model's attention is eager (its family, "
                          f"{hf_model.config.model_type}, supports no sdpa here); sequence parallelism needs sdpa "
                          "or flash_attention_2")
    if core in (None, "sdpa", PACKED_SDPA):
        register_packed_sdpa()
        hf_model.set_attn_implementation(PACKED_SDPA)
        core = PACKED_SDPA
    try:  # a previous run in this process left its Ulysses wrapper as a local override: back to the core itself
        del ALL_ATTENTION_FUNCTIONS[core]
    except KeyError:
        pass
    parallel_state_sp._release_sequence_parallel_groups()  # a second run in one process builds them anew
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=hf_model, core_attn_implementation=core, sequence_parallel_size=size,
        micro_batch_size=rows_per_forward, seq_length_is_variable=True, disable_in_eval=True)
    group = mpu.get_sequence_parallel_group()
    return SequenceParallel(size=size, rank=dist.get_rank(group=group), group=group, mpu=mpu, pad_id=pad_id)
