"""Benchmark of the fused LM head (forward + backward, peak extra memory). Not a test.

    python kernels/bench_fused_head.py --device cpu   # CPU row: 2048 tokens, H=1536, V=151,936
    python kernels/bench_fused_head.py --device cuda  # GPU row: 16,384 tokens, H=1536, V=151,936

Every method computes the same REDI-shaped objective over [2B, T] rows with a 25% ignored prompt prefix,
loss = sum_t c_{s_t} logp_t (c = REDI coefficients), except liger's chunked SimPO loss, which computes
SimPO on the same data (Liger has no REDI loss; its cost structure, per-chunk logits and torch.func
gradients, is what is compared). Each method runs in its own subprocess so that nothing one method
allocates or caches leaks into another's memory figure.

Time: wall clock of forward + backward (torch.cuda.synchronize on GPU), best of --reps after --warmup.
Memory:
  GPU: torch.cuda.max_memory_allocated() during forward + backward minus memory_allocated() before it
       (inputs resident, .grad None): the peak *extra* memory, gradients included.
  CPU: tracemalloc does not see torch's allocator, so the peak RSS is read from the kernel: write "5" to
       /proc/self/clear_refs (resets VmHWM to the current RSS), run forward + backward, read VmHWM from
       /proc/self/status; extra = VmHWM - RSS before. Tensors this large are mmap'd by glibc, so freed
       blocks go back to the OS and RSS follows the live tensors. Gradients included.
  "work" = extra minus the bytes of the returned gradients (d hidden + d weight), which every method
  must produce: the working memory of the method itself.
Floor: 6 N H V flops at the rate of one measured [N_valid, H] x [H, V] matmul on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

METHODS = ["naive", "liger_chunked_simpo", "liger_flce_none", "cce", "torch_twin", "torch_twin_c1024",
           "torch_twin_c256", "torch_twin_frozen_head", "triton", "triton_frozen_head"]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_inputs(args, device, dtype):
    g = torch.Generator().manual_seed(0)
    rows = args.rows
    t = args.tokens // rows
    hidden = torch.randn(rows, t, args.hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
    weight.requires_grad_()
    labels = torch.randint(0, args.vocab, (rows, t), generator=g).to(device)
    labels[:, : int(t * args.prompt_frac)] = -100
    # REDI-sized per-sequence coefficients (chosen rows -1/(B n), rejected +0.8/(B n)): inputs, not the loss
    n = (labels != -100).sum(-1).float()
    b = rows // 2
    coeffs = (torch.tensor([-1.0] * b + [0.8] * (rows - b)) / (b * n)).to(device)
    return hidden, weight, labels, coeffs


def build(method, hidden, weight, labels, coeffs, device):
    """A closure computing the loss (fresh graph each call); raises RuntimeError('skip: ...') if unavailable."""
    from redi_ds.kernels import FusedHeadOptions, fused_linear_loss, reference_sequence_logprobs

    seq = torch.arange(labels.shape[0], device=device).unsqueeze(1).expand_as(labels)
    w_tok = torch.where(labels != -100, coeffs[seq], torch.zeros((), device=device))
    if method == "naive":
        return lambda: (coeffs * reference_sequence_logprobs(hidden, weight, labels)[0]).sum()
    if method.endswith("_frozen_head"):  # LoRA: the head is frozen, no d(weight) matmul (a third of the FLOPs)
        if method.startswith("triton") and device != "cuda":
            raise RuntimeError("skip: GPU only")
        weight.requires_grad_(False)
        opts = FusedHeadOptions(impl=method.split("_")[0])
        return lambda: fused_linear_loss(hidden, weight, labels, coeffs, options=opts)[0]
    if method.startswith("torch_twin"):  # torch_twin: chunk_size "auto"; torch_twin_cN: N tokens per block
        opts = FusedHeadOptions(impl="torch", chunk_size=int(method[len("torch_twin_c"):]) if "_c" in method
                                else "auto")
        return lambda: fused_linear_loss(hidden, weight, labels, coeffs, options=opts)[0]
    if method == "triton":
        if device != "cuda":
            raise RuntimeError("skip: GPU only (the CPU interpreter is for tests, far too slow at this size)")
        return lambda: fused_linear_loss(hidden, weight, labels, coeffs, options=FusedHeadOptions(impl="triton"))[0]
    if method == "liger_chunked_simpo":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
        except ImportError as e:
            raise RuntimeError(f"skip: liger_kernel.chunked_loss not importable ({e})")
        fn = LigerFusedLinearSimPOLoss(compute_nll_loss=False, compiled=device == "cuda", chunk_size=1)

        def simpo():
            out = fn(weight, hidden, labels)
            return out[0] if isinstance(out, tuple) else out
        return simpo
    if method == "liger_flce_none":
        if device != "cuda":
            raise RuntimeError("skip: liger's fused linear cross-entropy is a Triton (CUDA) kernel")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        h2, y, w = hidden.view(-1, hidden.shape[-1]), labels.view(-1), w_tok.view(-1)

        def flce():
            out = liger_fused_linear_cross_entropy(h2, weight, y, reduction="none")
            ce = out[0] if isinstance(out, tuple) else out
            return -(w * ce.float()).sum()
        return flce
    if method == "cce":
        if device != "cuda":
            raise RuntimeError("skip: cut-cross-entropy needs CUDA")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            raise RuntimeError("skip: cut_cross_entropy not installed (pip install cut-cross-entropy)")
        return lambda: -(w_tok * linear_cross_entropy(hidden, weight, labels, reduction="none").float()).sum()
    raise ValueError(method)


def run_one(args) -> dict:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_num_threads(args.threads or torch.get_num_threads())
    hidden, weight, labels, coeffs = make_inputs(args, device, dtype)
    n_valid = int((labels != -100).sum())
    grad_bytes = hidden.numel() * hidden.element_size() + \
        (0 if (args.only or "").endswith("_frozen_head") else weight.numel() * weight.element_size())
    try:
        fn = build(args.only, hidden, weight, labels, coeffs, device)
    except RuntimeError as e:
        if str(e).startswith("skip:"):
            return {"method": args.only, "skip": str(e)[5:].strip()}
        raise

    def step():  # grad_output != 1 as DeepSpeed passes it (1/accum): the backward must scale in place
        (fn() * args.grad_output).backward()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
        hidden.grad = weight.grad = None
    times, peak = [], 0
    for _ in range(args.reps):
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_hwm()
            base = _rss()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        extra = (torch.cuda.max_memory_allocated() if device == "cuda" else _hwm()) - base
        peak = max(peak, extra)
        hidden.grad = weight.grad = None
    return {"method": args.only, "time_s": min(times), "peak_bytes": peak, "grad_bytes": grad_bytes,
            "n_valid": n_valid}


def gemm_floor(args) -> float:
    """Seconds for 6 N H V flops at the measured rate of one [N_valid, H] x [H, V] matmul."""
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(args.tokens * (1 - args.prompt_frac))
    a = torch.randn(n, args.hidden, device=device, dtype=dtype)
    b = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype)
    torch.mm(a, b.t())
    best = float("inf")
    for _ in range(3 if device == "cuda" else 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b.t())
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 3 * best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="total positions (default 16384 GPU, 2048 CPU)")
    p.add_argument("--rows", type=int, default=None, help="sequences (2B) (default 16 GPU, 4 CPU)")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--prompt-frac", type=float, default=0.25)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--grad-output", type=float, default=0.25, help="backward seed (DeepSpeed: 1/accum)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.tokens = args.tokens or (16384 if gpu else 2048)
    args.rows = args.rows or (16 if gpu else 4)
    args.reps = args.reps if args.reps is not None else (5 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 0)
    if args.only:
        print(json.dumps(run_one(args)))
        return
    if args.floor:
        print(json.dumps({"floor_s": gemm_floor(args)}))
        return

    base_cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                "--tokens", str(args.tokens), "--rows", str(args.rows), "--hidden", str(args.hidden),
                "--vocab", str(args.vocab), "--prompt-frac", str(args.prompt_frac), "--reps", str(args.reps),
                "--warmup", str(args.warmup), "--threads", str(args.threads), "--grad-output", str(args.grad_output)]

    def child(extra):
        r = subprocess.run(base_cmd + extra, capture_output=True, text=True, env=dict(os.environ))
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
        return json.loads(lines[-1])

    floor = child(["--floor"]).get("floor_s")
    results = []
    for m in args.methods.split(","):
        res = child(["--only", m])
        res.setdefault("method", m)
        results.append(res)
        print(f"# done {m}: {res}", file=sys.stderr, flush=True)

    dev = torch.cuda.get_device_name() if gpu else "CPU"
    naive = next((r for r in results if r["method"] == "naive" and "time_s" in r), None)
    print(f"\nfused head fwd+bwd, {dev}, {'bf16' if gpu else 'fp32'}: {args.tokens} tokens ({args.rows} rows, "
          f"{args.prompt_frac:.0%} prompt ignored), H={args.hidden}, V={args.vocab}, threads="
          f"{torch.get_num_threads() if not args.threads else args.threads}")
    if floor:
        print(f"6NHV floor (N = non-ignored tokens; 3 x one measured GEMM): {floor * 1e3:.0f} ms")
    mem_how = "peak CUDA allocated - before" if gpu else "peak RSS (VmHWM) - RSS before"
    print(f"memory: {mem_how}; work = extra - returned grads (dH + dW); backward seeded with "
          f"{args.grad_output}\n")
    print("| method | fwd+bwd ms | x floor | x naive time | peak extra MiB | work MiB | % naive peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "time_s" not in r:
            why = r.get("skip") or f"error: {r.get('error')}"
            print(f"| {r['method']} | - | - | - | - | - | {why} |")
            continue
        ms = r["time_s"] * 1e3
        mib = r["peak_bytes"] / 2**20
        work = (r["peak_bytes"] - r["grad_bytes"]) / 2**20
        xf = f"{r['time_s'] / floor:.2f}" if floor else "-"
        xn = f"{r['time_s'] / naive['time_s']:.2f}" if naive else "-"
        pn = f"{100 * r['peak_bytes'] / naive['peak_bytes']:.1f}%" if naive else "-"
        print(f"| {r['method']} | {ms:.0f} | {xf} | {xn} | {mib:.0f} | {work:.0f} | {pn} |")


if __name__ == "__main__":
    main()
