"""Bytes ZeRO-3 all-gathers per optimizer step, forward and backward, and how many of them are the LM head.

    torchrun --nproc_per_node 2 kernels/bench_zero3_gather.py [--steps 3] [--loss redi] [-- overrides]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 kernels/bench_zero3_gather.py --json out.json

Trains the embedded default (tiny Qwen2, V = 151,936, tied embeddings) with the trainer's own ``train`` for a
few steps with ``stage3_param_persistence_threshold: 0`` (every parameter really partitioned) and counts,
on rank 0, the parameters DeepSpeed's parameter coordinator gathers (elements x bytes of the compute dtype,
the full tensor each rank receives), split by phase (forward: fetches before a module's forward;
backward: fetches before a module's backward) and by whether the tensor is the LM head weight. A probe, not
a test: it wraps DeepSpeed's private ``PartitionedParameterCoordinator.__all_gather_params``.

With a linear loss (SFT, REDI) the fused head's backward needs no weight (the gradients are formed in the
forward pass), so the head must not be gathered in backward; a tied head is still gathered once in
backward by the embedding, whose backward DeepSpeed always prefetches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from redi_ds.ranks import is_rank0


def install_probe(counts: dict) -> None:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    name = "_PartitionedParameterCoordinator__all_gather_params"
    real = getattr(PartitionedParameterCoordinator, name)

    def probe(self, params, forward: bool):
        phase = "forward" if forward else "backward"
        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                what = "head" if getattr(p, "_redi_is_head", False) else "rest"
                counts[(phase, what)] += p.ds_numel * p.element_size()
        return real(self, params, forward)

    setattr(PartitionedParameterCoordinator, name, probe)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--loss", default="redi", help="sft | redi | dpo | simpo")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the figures here (rank 0)")
    args, rest = ap.parse_known_args(argv)
    import tempfile

    import torch

    from redi_ds.config import load_config
    from redi_ds.trainer import train
    import redi_ds.model as model_mod

    counts: dict = defaultdict(int)
    install_probe(counts)
    real_init = model_mod.FusedHead.__init__

    def mark_head(self, lm_head, options, *rest):  # tag the head's Parameter so the probe can tell it apart
        real_init(self, lm_head, options, *rest)
        self.weight._redi_is_head = True

    model_mod.FusedHead.__init__ = mark_head
    out = args.out or tempfile.mkdtemp(prefix="bench-gather-")
    stage = {"sft": "sft"}.get(args.loss, args.loss)
    cfg = load_config("tiny", stage=stage, overrides=[
        "--model.name_or_path", "tiny", "--model.sft_if_missing", "false", "--data.synthetic_size", "32",
        "--train.max_steps", str(args.steps), "--train.export", "false", "--tracking.enabled", "false",
        "--eval.heldout_every", "0", "--eval.benchmarks", "[]",
        "--deepspeed.zero", "{stage3_param_persistence_threshold: 0}", "--run.output_dir", out,
        "--run.resume", "never", *rest])
    train(cfg)
    if not is_rank0():
        return 0
    mib = {f"{ph}/{w}": counts[(ph, w)] / args.steps / 2**20 for ph in ("forward", "backward") for w in ("head", "rest")}
    head = cfg.model.tiny.vocab_size * cfg.model.tiny.hidden_size * torch.empty((), dtype=torch.float32).element_size()
    print(f"ZeRO-3 all-gather per optimizer step, loss {args.loss}, {args.steps} steps, world "
          f"{os.environ.get('WORLD_SIZE', '1')}, accum {cfg.train.global_batch_size // cfg.train.micro_batch_size // int(os.environ.get('WORLD_SIZE', '1'))}; head weight {head / 2**20:.1f} MiB")
    print("| phase | LM head MiB | other params MiB |")
    print("|---|---:|---:|")
    for ph in ("forward", "backward"):
        print(f"| {ph} | {mib[ph + '/head']:.1f} | {mib[ph + '/rest']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"loss": args.loss, "steps": args.steps, "head_mib": head / 2**20, "per_step_mib": mib}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
