"""Per-rank peak memory of one training step on a long packed pair, without and with sequence parallelism.

    python kernels/bench_sequence_parallel.py --tokens 16384                 # SP = 1, one process
    torchrun --nproc_per_node 2 kernels/bench_sequence_parallel.py --tokens 16384   # SP = 2

A (chosen, rejected) pair of ``--tokens`` tokens packed in one row (a 1/8 prompt each), a wider tiny Qwen2
(``--hidden``, ``--layers``, Qwen's vocabulary, tied head) in fp32, REDI through the fused head
(redi_ds.model.PolicyModel, chunk auto), forward + backward; with more than one process, DeepSpeed's Ulysses
with N = the world size (redi_ds.parallel). Memory: each rank's peak RSS during the step minus its RSS before
(``/proc/self/clear_refs`` + ``VmHWM``, as kernels/bench_fused_head.py explains); the returned gradients are
included. On CPU the core attention is ``redi_ds.parallel.packed_sdpa``: one causal sdpa call per sequence,
no [T, T] mask, so what remains is the activations that grow with the tokens a rank holds (and, under SP,
the all-to-all buffers). Not a test: a table for kernels/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from redi_ds.ranks import is_rank0, rank


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch.distributed as dist
    import transformers

    from redi_ds.losses import loss_config
    from redi_ds.data.collate import collate
    from redi_ds.data.layout import PAIRS
    from redi_ds.kernels import FusedHeadOptions
    from redi_ds.losses import StepTotals, build_loss
    from redi_ds.model import PolicyModel
    from redi_ds.parallel import setup

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from redi_ds.distributed import init_distributed

        init_distributed()  # torch.distributed and deepspeed.comm (Ulysses uses it)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads // 2, vocab_size=151936, tie_word_embeddings=True,
                                   max_position_embeddings=args.tokens)
    hf = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    sp = setup(hf, world, rows_per_forward=1, pad_id=0) if world > 1 else None
    if sp is None:  # one process: the same packed-aware core attention, without Ulysses
        from redi_ds.parallel import PACKED_SDPA, register_packed_sdpa

        register_packed_sdpa()
        hf.set_attn_implementation(PACKED_SDPA)
    model = PolicyModel(hf, build_loss(loss_config("redi")), FusedHeadOptions(impl="torch"), sp=sp).train()
    g = torch.Generator().manual_seed(1)
    half = args.tokens // 2
    prompt = half // 8
    ex = {"prompt_ids": torch.randint(0, 151000, (prompt,), generator=g).tolist(),
          "chosen_ids": torch.randint(0, 151000, (half - prompt,), generator=g).tolist(),
          "rejected_ids": torch.randint(0, 151000, (half - prompt,), generator=g).tolist()}
    batch = collate([ex], PAIRS, pad_id=0, padding_free=True)
    totals = StepTotals(examples=1, tokens=int(batch["counts"].sum()))
    if world > 1:
        dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    t0 = time.perf_counter()
    share, _ = model(batch, totals)
    share.backward()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM:") - before
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [{"rank": rank(), "peak_extra_mib": peak / 2**20, "seconds": seconds}]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows[0])
        rows = gathered
    if is_rank0():
        print(f"SP = {world}: {args.tokens}-token packed pair, hidden {args.hidden}, {args.layers} layers, "
              f"{args.heads} heads, V = 151936 (weights + grads {2 * params / 2**20:.0f} MiB), fp32, CPU")
        print("| SP | rank | tokens on the rank | peak extra MiB | fwd+bwd s |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {world} | {r['rank']} | {args.tokens // world} | {r['peak_extra_mib']:.0f} | {r['seconds']:.1f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"sp": world, "tokens": args.tokens, "rows": rows}, f, indent=1)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
