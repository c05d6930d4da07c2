"""The GPU path in one command: correctness, the head benchmark, and a one-GPU ZeRO-3 training step.

    bash kernels/gpu_check.sh                     # a bare GPU machine: installs the carried wheels, runs this
    python kernels/gpu_check.py --out DIR         # where redi_ds and its dependencies are installed
    python kernels/gpu_check.py --dry-run         # the same plumbing on CPU at tiny shapes (what CI runs)

Sections (``--sections``, in this order; each writes its rows to ``DIR/gpu_check.json`` as soon as it is done,
so a run stopped at its time limit still leaves what it measured):

1. ``correctness``: the Triton head against float64 (both forms: the single pass of linear losses and the
   two-pass form of DPO/SimPO), in bf16 and fp32, on odd shapes and at V = 151,936, with Gemma's softcap and
   Cohere's logit scale on two of them: relative error ||x - ref|| / ||ref|| of the per-sequence sums, d hidden and
   d weight (and d bias where the head has one).
2. ``pytest``: ``pytest -m gpu tests/test_kernels.py`` (the CUDA cases of the kernel tests).
3. ``bench``: forward + backward of one objective, the token-mean NLL of all N tokens (SFT; REDI has the same
   cost: one coefficient per sequence), bf16, V = 151,936, for each H and N, by every method: our triton impl
   single pass (``fused_linear_loss``), with a frozen head (LoRA: no d(weight)) and two-pass
   (``fused_sequence_logprobs``, what DPO and SimPO use), our
   torch twin, the naive logits path, Liger's fused linear cross-entropy, cut-cross-entropy's
   ``linear_cross_entropy``. Time: CUDA events, 2 warm-ups, the median of 5, the inputs rotated over 3 sets.
   Memory: peak allocated during the measured call minus allocated before (inputs resident, grads None).
   Floor: 6 N H V flops at the rate cuBLAS reaches on one [N, H] x [H, V] bf16 product of that shape.
   Every method's loss is checked against the naive one (the same number, to bf16 precision).
4. ``train``: Qwen2.5-Math-1.5B's shape (random init from its config, tied head), ZeRO-3 world 1, bf16,
   gradient checkpointing, sdpa; REDI on one packed pair of ~16k tokens per step, 5 steps, through the
   trainer's own ``build`` / ``train_step``: tokens/s, MFU (6 x parameters x tokens/s over the measured 8192^3
   bf16 matmul rate) and peak memory, for ``kernel.impl: auto`` (triton), ``reference``, and with Liger's
   body kernels on. Each variant in a process of its own (``kernels/gpu_train_step.py``).

The dry run shrinks every shape (H = 64, V = 4099 for the head; a 2-layer model and ~1k-token pairs for the step),
runs on the CPU (fp32; the Triton kernel in its interpreter) and skips what needs CUDA (Liger, CCE), saying so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the Triton interpreter must be on before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from gpu_train_step import QWEN_VOCAB, train_variants  # noqa: E402  (section 4, beside this script)

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("correctness", "pytest", "bench", "train")
METHODS = ("triton", "triton_2pass", "triton_frozen_head", "torch_twin", "naive", "liger_flce", "cce")



class Skip(Exception):
    """A method or variant this machine cannot run (no CUDA, a package missing): reported, not failed."""


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- results, written as they come


class Report:
    def __init__(self, out: Path, dry: bool):
        self.out, self.dry = out, dry
        self.data: dict = {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))


def environment() -> dict:
    import importlib.metadata as md

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for pkg in ("triton", "transformers", "deepspeed", "datasets", "liger-kernel", "cut-cross-entropy", "peft"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def matmul_rate(m: int, k: int, n: int, dtype=torch.bfloat16, reps: int = 10) -> float:
    """FLOP/s of one [m, k] x [k, n] product (CUDA events, median), on random data."""
    dev = device()
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(n, k, device=dev, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b.t())
    times = [_timed(lambda: torch.mm(a, b.t())) for _ in range(reps if dev == "cuda" else 1)]
    return 2.0 * m * k * n / statistics.median(times)


def _timed(fn) -> float:
    """Seconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- 1. correctness


def _rel(x, ref) -> float:
    x, ref = x.detach().double().flatten(), ref.detach().double().flatten()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def correctness(dry: bool) -> list[dict]:
    """Triton head vs float64 reference: sums, d hidden, d weight (d bias where the head has one)."""
    from redi_ds.kernels import FusedHeadOptions, fused_linear_loss, fused_sequence_logprobs
    from redi_ds.kernels.reference import reference_sequence_logprobs

    dev = device()
    from redi_ds.kernels import LogitTransform

    gemma = LogitTransform(softcap=30.0)  # Gemma2/3's final_logit_softcapping (raw logits std ~4 here)
    shapes = [(3, 37, 24, 131, True, None), (2, 300, 64, 4099, False, gemma)] if dry else \
        [(3, 37, 24, 131, True, None), (4, 300, 512, 32003, False, None), (3, 1001, 1536, QWEN_VOCAB, False, None),
         (2, 2048, 3584, QWEN_VOCAB, True, None), (3, 1001, 1536, QWEN_VOCAB, False, gemma),
         (2, 300, 512, 32003, True, LogitTransform(scale=0.0625))]
    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16]
    rows = []
    for (n, t, h, v, has_bias, transform) in shapes:
        g = torch.Generator().manual_seed(n * 1000 + h)
        hidden64 = torch.randn(n, t, h, generator=g, dtype=torch.float64)  # rounded to each dtype below
        weight64 = torch.randn(v, h, generator=g, dtype=torch.float64) * (4.0 / math.sqrt(h))  # logits std ~4
        bias64 = torch.randn(v, generator=g, dtype=torch.float64) * 0.3 if has_bias else None
        labels = torch.randint(0, v, (n, t), generator=g)
        labels[0, : t // 4] = -100
        labels[-1, t - 5:] = -100
        labels = labels.to(dev)
        coeffs = torch.linspace(-1.0, 0.8, n, dtype=torch.float64) / t
        for dtype in dtypes:
            # the oracle: float64 on the device, from the inputs as rounded to dtype (the kernel's error only)
            x64 = [None if x is None else x.to(dtype).double().to(dev) for x in (hidden64, weight64, bias64)]
            hr, wr, br = [None if x is None else x.clone().requires_grad_() for x in x64]
            sums_ref, _ = reference_sequence_logprobs(hr, wr, labels, br,
                                                      transform=transform or LogitTransform())
            (coeffs.to(dev) * sums_ref).sum().backward()
            refs = [x.grad for x in (hr, wr, br) if x is not None]
            for form in ("single_pass", "two_pass"):
                hx, wx, bx = [None if x is None else x.to(dtype).clone().requires_grad_() for x in x64]
                leaves = [x for x in (hx, wx, bx) if x is not None]
                opts = FusedHeadOptions(impl="triton", block_v=64 if v < 1000 else 32768)
                if form == "single_pass":
                    loss, sums, _ = fused_linear_loss(hx, wx, labels, coeffs.to(dev), bx, options=opts,
                                                      transform=transform)
                    (loss * 0.25).backward()  # DeepSpeed seeds backward with 1/accum: scaled in place
                    grads = [x.grad * 4.0 for x in leaves]
                else:
                    sums, _ = fused_sequence_logprobs(hx, wx, labels, bx, options=opts, transform=transform)
                    (coeffs.to(dev, sums.dtype) * sums).sum().backward()
                    grads = [x.grad for x in leaves]
                names = ["dhidden", "dweight"] + (["dbias"] if has_bias else [])
                err = {"sums": _rel(sums, sums_ref), **{k: _rel(gr, r) for k, gr, r in zip(names, grads, refs)}}
                tol = 2e-5 if dtype == torch.float32 else 1e-2
                rows.append({"shape": f"{n}x{t} H={h} V={v}" + (" +bias" if has_bias else "")
                             + (f" [{transform}]" if transform else ""),
                             "dtype": str(dtype).replace("torch.", ""), "form": form,
                             **{k: float(f"{e:.3g}") for k, e in err.items()}, "tol": tol,
                             "ok": all(e <= tol for e in err.values())})
                print(f"# correctness {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. pytest


def run_pytest() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = [ln for ln in r.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
    return {"command": " ".join(cmd[2:]), "returncode": r.returncode, "summary": tail[0],
            "output": r.stdout[-4000:] + r.stderr[-2000:]}


# ----------------------------------------------------------------------------- 3. head benchmark


def _objective(method: str, hidden, weight, labels, coeffs):
    """A closure: the token-mean NLL over every target, by ``method`` (a fresh graph per call)."""
    from redi_ds.kernels import FusedHeadOptions, fused_linear_loss, fused_sequence_logprobs
    from redi_ds.kernels.reference import reference_sequence_logprobs

    n_tok = int((labels != -100).sum())
    h2, y = hidden.view(-1, hidden.shape[-1]), labels.view(-1)
    if method in ("triton", "triton_frozen_head"):  # frozen head (LoRA): no d(weight), a third of the FLOPs
        if hidden.device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            raise Skip("needs CUDA")
        return lambda: fused_linear_loss(hidden, weight, labels, coeffs, options=FusedHeadOptions(impl="triton"))[0]
    if method == "triton_2pass":
        opts = FusedHeadOptions(impl="triton")
        return lambda: -fused_sequence_logprobs(hidden, weight, labels, options=opts)[0].sum() / n_tok
    if method == "torch_twin":
        return lambda: fused_linear_loss(hidden, weight, labels, coeffs, options=FusedHeadOptions(impl="torch"))[0]
    if method == "naive":
        return lambda: -reference_sequence_logprobs(hidden, weight, labels)[0].sum() / n_tok
    if method == "liger_flce":
        flce = _peer(hidden, "liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy",
                     "Liger's fused linear cross-entropy is a CUDA kernel")

        def liger():
            out = flce(h2, weight, y, reduction="mean")
            return out[0] if isinstance(out, tuple) else out
        return liger
    if method == "cce":
        cce = _peer(hidden, "cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy needs CUDA")
        return lambda: cce(h2, weight, y, reduction="mean")
    raise ValueError(method)


def _peer(hidden, module: str, name: str, cuda_only: str):
    """A peer's function, or Skip (no CUDA, or the package missing)."""
    import importlib

    if hidden.device.type != "cuda":
        raise Skip(cuda_only)
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise Skip(f"{module} not importable ({e})")


def bench_one(method: str, h: int, n: int, v: int, dtype, warmup: int, reps: int, sets: int) -> dict:
    dev = device()
    rows_len = min(n, 2048)  # sequences of 2048 tokens: a coefficient per sequence, as REDI's
    g = torch.Generator(device=dev).manual_seed(h + n)
    weight = (torch.randn(v, h, device=dev, dtype=dtype, generator=g) * (2.0 / math.sqrt(h)))
    weight.requires_grad_(not method.endswith("_frozen_head"))
    inputs = []
    for _ in range(sets):
        hidden = torch.randn(n // rows_len, rows_len, h, device=dev, dtype=dtype, generator=g).requires_grad_()
        labels = torch.randint(0, v, (n // rows_len, rows_len), device=dev, generator=g)
        coeffs = torch.full((n // rows_len,), -1.0 / n, device=dev, dtype=torch.float64)
        inputs.append((hidden, labels, coeffs, _objective(method, hidden, weight, labels, coeffs)))

    def call(i: int) -> float:
        hidden, _, _, fn = inputs[i % sets]
        loss = fn()
        loss.backward()
        value = float(loss.detach())
        hidden.grad = weight.grad = None
        return value

    for i in range(warmup):
        call(i)
    sync()
    times, losses = [], []
    for i in range(reps):
        times.append(_timed(lambda: losses.append(call(i))))
    sync()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call(0)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None
    return {"method": method, "H": h, "N": n, "ms": 1e3 * statistics.median(times),
            "ms_min": 1e3 * min(times), "peak_extra_mib": None if peak is None else peak / 2**20,
            "loss": losses[0]}


def bench(dry: bool, hiddens: list[int], tokens: list[int], methods: list[str]) -> list[dict]:
    dev = device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    v = 4099 if dry else QWEN_VOCAB
    rows = []
    for h in hiddens:
        for n in tokens:
            floor_s = 6.0 * n * h * v / matmul_rate(n, h, v, dtype)
            naive_loss, results = None, []
            for m in methods:
                try:
                    r = bench_one(m, h, n, v, dtype, warmup=1 if dry else 2, reps=1 if dry else 5, sets=3)
                except Skip as e:
                    r = {"method": m, "H": h, "N": n, "skip": str(e)}
                except torch.cuda.OutOfMemoryError:
                    r = {"method": m, "H": h, "N": n, "skip": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001  (a peer's kernel failing is a finding, not a crash)
                    r = {"method": m, "H": h, "N": n, "skip": f"error: {type(e).__name__}: {str(e)[:160]}"}
                if dev == "cuda":
                    torch.cuda.empty_cache()
                if "ms" in r:
                    r["x_floor"] = r["ms"] / 1e3 / floor_s
                    if m == "naive":
                        naive_loss = r["loss"]
                r["floor_ms"] = floor_s * 1e3
                results.append(r)
                print(f"# bench {r}", file=sys.stderr, flush=True)
            naive = next((r for r in results if r["method"] == "naive" and "ms" in r), None)
            for r in results:
                if "ms" in r and naive_loss is not None:
                    r["loss_vs_naive"] = abs(r["loss"] - naive_loss) / abs(naive_loss)
                if "ms" in r and naive and naive.get("peak_extra_mib") and r.get("peak_extra_mib") is not None:
                    r["pct_naive_peak"] = 100.0 * r["peak_extra_mib"] / naive["peak_extra_mib"]
            rows.extend(results)
    return rows


# ----------------------------------------------------------------------------- the table


def table(rep: dict) -> str:
    lines = [f"GPU check ({'dry run, ' if rep['dry_run'] else ''}{rep['env']['device']}; torch {rep['env']['torch']}, "
             f"triton {rep['env']['triton']}, transformers {rep['env']['transformers']}, "
             f"deepspeed {rep['env']['deepspeed']})"]
    if "matmul_tflops" in rep:
        lines.append(f"cuBLAS matmul {'256^3 fp32' if rep['dry_run'] else '8192^3 bf16'}: "
                     f"{rep['matmul_tflops']:.1f} TFLOP/s (the MFU denominator)")
    if "correctness" in rep:
        bad = [r for r in rep["correctness"] if not r["ok"]]
        worst = {}
        for r in rep["correctness"]:
            for k in ("sums", "dhidden", "dweight", "dbias"):
                if k in r:
                    key = (r["dtype"], k)
                    worst[key] = max(worst.get(key, 0.0), r[k])
        lines.append(f"\ncorrectness: {len(rep['correctness']) - len(bad)}/{len(rep['correctness'])} ok; worst rel. "
                     "error by dtype: " + ", ".join(f"{d} {k} {e:.2g}" for (d, k), e in sorted(worst.items())))
        for r in bad:
            lines.append(f"  FAILED {r}")
    if "pytest" in rep:
        lines.append(f"pytest -m gpu: {rep['pytest']['summary']} (exit {rep['pytest']['returncode']})")
    if "bench" in rep:
        lines.append("\n| H | N | method | ms (median) | x floor | peak extra MiB | % naive peak | loss err |")
        lines.append("|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in rep["bench"]:
            if "ms" not in r:
                lines.append(f"| {r['H']} | {r['N']} | {r['method']} | - | - | - | - | {r['skip']} |")
                continue
            mem = "-" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}"
            pct = f"{r['pct_naive_peak']:.1f}%" if "pct_naive_peak" in r else "-"
            err = f"{r['loss_vs_naive']:.1e}" if "loss_vs_naive" in r else "-"
            lines.append(f"| {r['H']} | {r['N']} | {r['method']} | {r['ms']:.2f} | {r['x_floor']:.2f} | {mem} | {pct} "
                         f"| {err} |")
    if "train" in rep:
        peak = rep.get("matmul_tflops")
        ref = next((r for r in rep["train"] if r.get("variant") == "reference" and "steps" in r), None)
        lines.append("\n| training variant | params | tokens/step | tokens/s | MFU | peak GiB | losses | vs reference |")
        lines.append("|---|---:|---:|---:|---:|---:|---|---:|")
        for r in rep["train"]:
            if "skip" in r:
                lines.append(f"| {r['variant']} | - | - | - | - | - | {r['skip']} | - |")
                continue
            gap = "-" if ref is None else f"{max(abs(a['loss'] - b['loss']) for a, b in zip(r['steps'], ref['steps'])):.1e}"
            mfu = f"{100 * r['flops_per_s'] / (peak * 1e12):.1f}%" if peak else "-"
            gib = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            losses = ", ".join(f"{s['loss']:.4f}" for s in r["steps"])
            lines.append(f"| {r['variant']} | {r['params'] / 1e9:.3f} B | {r['tokens_per_step']} | "
                         f"{r['tokens_per_s']:.0f} | {mfu} | {gib} | {losses} | {gap} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the plumbing, not the numbers")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--hidden", default=None, help="comma-separated H (default 1536,3584)")
    p.add_argument("--tokens", default=None, help="comma-separated N (default 4096,16384,32768)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run for the CPU plumbing check", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    rep = Report(out, dry)
    rep.put("env", environment())
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"error: unknown --sections {unknown} (known: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    t0 = time.time()
    rep.put("matmul_tflops", matmul_rate(*(256,) * 3 if dry else (8192,) * 3,
                                         dtype=torch.float32 if dry else torch.bfloat16) / 1e12)
    hiddens = [int(x) for x in (args.hidden or ("64" if dry else "1536,3584")).split(",")]
    tokens = [int(x) for x in (args.tokens or ("512,1024" if dry else "4096,16384,32768")).split(",")]
    for section in sections:
        s0 = time.time()
        if section == "correctness":
            rep.put("correctness", correctness(dry))
        elif section == "pytest":
            rep.put("pytest", run_pytest())
        elif section == "bench":
            rep.put("bench", bench(dry, hiddens, tokens, args.methods.split(",")))
        elif section == "train":
            rep.put("train", train_variants(dry, out, args.steps))
        rep.put(f"seconds_{section}", round(time.time() - s0, 1))
    rep.put("seconds", round(time.time() - t0, 1))
    text = table(rep.data)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    failed = [r for r in rep.data.get("correctness", []) if not r["ok"]]
    return 1 if failed or rep.data.get("pytest", {}).get("returncode", 0) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
