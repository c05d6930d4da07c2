"""Section 4 of kernels/gpu_check.py: a one-GPU ZeRO-3 training step through the trainer's own ``build`` /
``train_step``, one variant a process (``python kernels/gpu_train_step.py SPEC_JSON`` prints its row as JSON).

Qwen2.5-Math-1.5B's shape (random init from its config, tied head), bf16, gradient checkpointing, sdpa; REDI on
one packed pair of ~16k tokens per step: tokens/s, parameters and peak memory, for ``kernel.impl: auto``
(triton), ``reference``, and with Liger's body kernels on. The dry run: a 2-layer model, ~1k-token pairs, fp32 on
the CPU.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import torch

QWEN_VOCAB = 151936
QWEN15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=QWEN_VOCAB, max_position_embeddings=32768, rope_theta=10000.0,
               tie_word_embeddings=True)


def long_pairs(path: Path, tokenizer, pairs: int, tokens_per_response: int) -> None:
    """Pairs whose chosen and rejected responses are ~tokens_per_response tokens each (random words)."""
    words = ("the sum of squares equals twice the product so we divide both sides by three and check the "
             "remainder modulo seven then factor the quadratic into linear terms whose roots are integers").split()
    rng = random.Random(0)
    probe = " ".join(rng.choice(words) for _ in range(2000))
    per_word = len(tokenizer(probe)["input_ids"]) / 2000
    n_words = int(tokens_per_response / per_word)
    with open(path, "w") as f:
        for i in range(pairs):
            row = {"prompt": f"Problem {i}: " + " ".join(rng.choice(words) for _ in range(60)),
                   "chosen": " ".join(rng.choice(words) for _ in range(n_words)) + " \\boxed{7}",
                   "rejected": " ".join(rng.choice(words) for _ in range(n_words)) + " \\boxed{8}"}
            f.write(json.dumps(row) + "\n")


def train_child(spec: dict) -> dict:
    """One variant in this process: build the trainer's run, 5 steps, measure; no final checkpoint."""
    from redi_ds.config import load_config
    from redi_ds.model import load_tokenizer
    from redi_ds.trainer import build, record, train_step

    out = Path(spec["out"])
    shape = spec["shape"]
    settings = {
        "model.name_or_path": "tiny", "model.tokenizer": "qwen2.5", "model.chat_template": "qwen2.5-math",
        "model.sft_if_missing": False, "model.gradient_checkpointing": True,
        "model.attn_implementation": "sdpa", "model.liger": spec["liger"], "kernel.impl": spec["impl"],
        "data.path": str(out / "pairs.jsonl"), "data.padding_free": True, "data.max_prompt_length": 512,
        "data.max_length": 2 * spec["tokens_per_response"] + 1024, "data.shuffle": False,
        "train.micro_batch_size": 1, "train.global_batch_size": 1, "train.max_steps": spec["steps"],
        "train.lr": 1e-6, "train.warmup_ratio": 0.0, "train.export": False, "train.save_every": 0,
        "deepspeed.config": "zero3", "deepspeed.precision": spec["precision"],
        "tracking.enabled": False, "eval.benchmarks": [], "eval.heldout_every": 0,
        "run.output_dir": str(out / f"run-{spec['name']}"), "run.resume": "never",
        **{f"model.tiny.{k}": v for k, v in shape.items()},
    }
    cfg = load_config("tiny", stage="redi", settings=settings)
    tok = load_tokenizer(cfg.model, "tiny")
    if not (out / "pairs.jsonl").exists():
        long_pairs(out / "pairs.jsonl", tok, pairs=spec["steps"] + 1, tokens_per_response=spec["tokens_per_response"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = build(cfg)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in run.engine.module.parameters())
    steps = []
    try:
        for s in range(spec["steps"]):
            stats = train_step(run, s)
            record(run, stats)
            steps.append({"step": stats.step, "loss": stats.loss, "tokens": stats.tokens,
                          "step_s": stats.step_time, "grad_norm": stats.grad_norm})
            print(f"# train {spec['name']} {steps[-1]}", file=sys.stderr, flush=True)
    finally:
        run.bar.close()
        run.lock.release()
    timed = steps[1:] or steps  # the first step includes compilation and allocator warm-up
    tok_s = statistics.median(s["tokens"] / s["step_s"] for s in timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"variant": spec["name"], "params": params, "tokens_per_step": steps[-1]["tokens"],
            "tokens_per_s": tok_s, "flops_per_s": 6.0 * params * tok_s, "peak_gib": peak, "steps": steps}


def train_variants(dry: bool, out: Path, steps: int) -> list[dict]:
    shape = dict(QWEN15B) if not dry else dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                vocab_size=QWEN_VOCAB, max_position_embeddings=4096,
                                                rope_theta=10000.0, tie_word_embeddings=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"redi_gpu_check_{os.getpid()}"  # run folders: not under --out
    work.mkdir(parents=True, exist_ok=True)
    base = {"out": str(work), "shape": shape, "steps": 2 if dry else steps,
            "tokens_per_response": 400 if dry else 8000, "precision": "fp32" if dry else "bf16"}
    variants = [{"name": "triton" if not dry else "torch", "impl": "auto", "liger": "off"},
                {"name": "reference", "impl": "reference", "liger": "off"},
                {"name": "triton+liger", "impl": "auto", "liger": "on"}]
    rows = []
    for v in variants:
        if v["liger"] == "on" and not torch.cuda.is_available():
            rows.append({"variant": v["name"], "skip": "Liger's body kernels need CUDA"})
            continue
        spec = {**base, **v}
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "MASTER_PORT": str(29500 + random.Random().randrange(2000))}
        env.pop("TRITON_INTERPRET", None)
        r = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env,
                           capture_output=True, text=True, timeout=1200)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            err = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
            rows.append({"variant": v["name"], "skip": f"error (exit {r.returncode}): "
                                                       f"{(err[-1] if err else '?')[:200]}",
                         "stderr": r.stderr[-3000:]})
            (out / f"train-{v['name']}.log").write_text(r.stderr[-200000:])
        else:
            rows.append(json.loads(lines[-1]))
        print(f"# train {rows[-1].get('variant')}: {rows[-1].get('tokens_per_s', rows[-1].get('skip'))}",
              file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    print(json.dumps(train_child(json.loads(sys.argv[1]))))
