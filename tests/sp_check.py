"""Test helper, run by tests/test_parallel.py under torchrun with 2 ranks (gloo):

    torchrun --nproc_per_node 2 tests/sp_check.py OUT.json

DeepSpeed's Ulysses (redi_ds.parallel.setup) on a tiny float64 Qwen2: PolicyModel's share, metrics and every
parameter's gradient, summed over the two ranks, against one rank's whole-batch computation without SP; and a
counter-test with plain sdpa as the core attention on packed rows (the sequence boundary ignored).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def tiny(seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float64)


def policy(loss: str, sp=None, hf=None):
    from redi_ds.losses import loss_config
    from redi_ds.kernels import FusedHeadOptions
    from redi_ds.losses import build_loss
    from redi_ds.model import PolicyModel

    return PolicyModel(hf if hf is not None else tiny(3), build_loss(loss_config(loss)),
                       FusedHeadOptions(impl="torch", chunk_size=5), sp=sp)


def run(model, batch, totals):
    model.zero_grad(set_to_none=True)
    share, metrics = model(batch, totals)
    share.backward()
    return share.detach(), {k: float(v) for k, v in metrics.items()}, {n: p.grad.detach().clone()
                                                                       for n, p in model.named_parameters()}


def summed(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


def main(out: str) -> int:
    from redi_ds.data.collate import collate
    from redi_ds.data.layout import PAIRS, SFT_ROWS
    from redi_ds.losses import StepTotals
    from redi_ds.parallel import SequenceParallel, setup

    from redi_ds.distributed import init_distributed

    init_distributed()  # deepspeed.comm too: Ulysses asserts it
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 60, (n,), generator=g).tolist()

    # odd lengths; a pair whose rejected response is a single token
    examples = [{"prompt_ids": ids(5), "chosen_ids": ids(9), "rejected_ids": ids(1)},
                {"prompt_ids": ids(3), "chosen_ids": ids(4), "rejected_ids": ids(11)}]
    res = {"cases": {}}
    for loss, packed in (("redi", True), ("redi", False), ("simpo", True), ("sft", True)):
        layout = SFT_ROWS if loss == "sft" else PAIRS
        exs = [{"prompt_ids": e["prompt_ids"], "response_ids": e["chosen_ids"]} for e in examples] \
            if layout == SFT_ROWS else examples
        batch = collate(exs, layout, pad_id=0, padding_free=packed)
        totals = StepTotals(examples=2, tokens=int(batch["counts"].sum()))
        ref_share, ref_metrics, ref_grads = run(policy(loss).train(), batch, totals)  # whole rows, no SP
        hf = tiny(3)
        sp = setup(hf, 2, rows_per_forward=batch["input_ids"].shape[0], pad_id=0)
        model = policy(loss, sp=sp, hf=hf).train()
        share, metrics, grads = run(model, batch, totals)
        share = summed(share)
        grad_err = max(float((summed(grads[n]) - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-30))
                       for n in ref_grads)
        sums_err = max([abs(float(share - ref_share)) / max(abs(float(ref_share)), 1e-30)]
                       + [abs(metrics[k] - ref_metrics[k]) / max(abs(ref_metrics[k]), 1e-30) for k in ref_metrics])
        res["cases"][f"{loss}-{'packed' if packed else 'padded'}"] = {"sums_err": sums_err, "grad_err": grad_err}
    # counter-test: plain sdpa under Ulysses on the packed row lets the rejected trace attend to the chosen one
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    batch = collate(examples, PAIRS, pad_id=0, padding_free=True)
    totals = StepTotals(examples=2, tokens=int(batch["counts"].sum()))
    ref_share, _, _ = run(policy("redi").train(), batch, totals)
    hf = tiny(3)
    parallel_state_sp._release_sequence_parallel_groups()
    mpu = UlyssesSPAttentionHF.register_with_transformers(model_name_or_path=hf, core_attn_implementation="sdpa",
                                                          sequence_parallel_size=2, micro_batch_size=1,
                                                          seq_length_is_variable=True, disable_in_eval=True)
    group = mpu.get_sequence_parallel_group()
    sp = SequenceParallel(size=2, rank=dist.get_rank(group=group), group=group, mpu=mpu, pad_id=0)
    share, _, _ = run(policy("redi", sp=sp, hf=hf).train(), batch, totals)
    res["leak"] = {"sums_err": abs(float(summed(share) - ref_share)) / abs(float(ref_share))}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
