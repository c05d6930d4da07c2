"""Per-rank memory of LoRA against full fine-tuning at the same shape, through the trainer. Not a test.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 kernels/bench_lora_memory.py [--hidden 512 --layers 8] [--lora-r 16]

Trains the tiny Qwen2 architecture at the given size (Qwen's vocabulary, tied head) with ZeRO-3, fp32 on CPU (bf16
on CUDA), 3 steps of SFT, once fully and once with LoRA, each in a fresh process group of this launch, and prints
per rank: peak memory (CUDA: max allocated; CPU: the process's peak RSS, VmHWM, which includes the Python and
library baseline) and the parameter, gradient and optimizer-state bytes DeepSpeed holds for the rank (counted from
its partitions). The model states are what LoRA removes: fp32 master + Adam moments + gradients of the frozen
weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from bench_fused_head import _hwm, _reset_hwm  # a sibling script (kernels/ is on the path when run as one)

from redi_ds.ranks import is_rank0


def _state_bytes(engine) -> dict:
    """Bytes of this rank's partition of parameters, and of the optimizer state it holds."""
    params = sum(getattr(p, "ds_tensor", p).numel() * getattr(p, "ds_tensor", p).element_size()
                 for p in engine.module.parameters())
    opt = engine.optimizer
    state = getattr(getattr(opt, "optimizer", opt), "state", {})
    optim = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))
    master = sum(t.numel() * t.element_size() for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    return {"param_bytes": params, "optim_state_bytes": optim + master}


def run(args, lora_r: int) -> dict:
    from redi_ds.config import load_config
    from redi_ds.trainer import build, record, train_step

    out = tempfile.mkdtemp(prefix=f"lora-mem-{lora_r}-")
    cfg = load_config("tiny", stage="sft", overrides=[
        "--model.tiny.hidden_size", str(args.hidden), "--model.tiny.intermediate_size", str(3 * args.hidden),
        "--model.tiny.num_hidden_layers", str(args.layers), "--model.tiny.num_attention_heads", "8",
        "--model.tiny.num_key_value_heads", "2", "--model.lora.r", str(lora_r), "--train.max_steps", "3",
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.export", "false",
        "--tracking.enabled", "false", "--eval.benchmarks", "[]", "--eval.heldout_every", "0",
        "--data.synthetic_size", "16", "--deepspeed.zero", "{stage3_param_persistence_threshold: 0}",
        "--run.output_dir", out])
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_hwm()  # VmHWM back to the current RSS: this run's own peak
    run_ = build(cfg)
    try:
        for s in range(3):
            record(run_, train_step(run_, s))
        states = _state_bytes(run_.engine)
    finally:
        run_.bar.close()
        run_.lock.release()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _hwm()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in run_.engine.module.parameters() if p.requires_grad)
    run_.engine.destroy()
    return {"lora_r": lora_r, "rank": int(os.environ.get("RANK", "0")), "peak_bytes": peak,
            "trainable": trainable, **states}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    args = p.parse_args(argv)
    rows = [run(args, 0), run(args, args.lora_r)]
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if is_rank0():
        flat = [r for rank_rows in gathered for r in rank_rows]
        print(json.dumps(flat), file=sys.stderr)
        mib = 2 ** 20
        print(f"\nper-rank memory, tiny Qwen2 H={args.hidden} x {args.layers} layers, V=151,936, ZeRO-3, "
              f"{dist.get_world_size()} ranks, {'CUDA bf16' if torch.cuda.is_available() else 'CPU fp32'}")
        print("| run | rank | trainable params | param partition MiB | optimizer + fp32 master MiB | peak MiB |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in flat:
            name = "full" if r["lora_r"] == 0 else f"LoRA r={r['lora_r']}"
            print(f"| {name} | {r['rank']} | {r['trainable']:,} | {r['param_bytes'] / mib:.1f} | "
                  f"{r['optim_state_bytes'] / mib:.1f} | {r['peak_bytes'] / mib:.0f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
