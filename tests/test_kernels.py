"""Fused LM-head kernels (redi_ds.kernels) against the float64 reference (the unfused oracle).

impl="torch" runs here in float64 and float32. impl="triton" runs on CPU tensors in the Triton interpreter
(fp32): those cases are only collected when TRITON_INTERPRET=1 was set before this process started. The
normal session gets them through tests/test_kernels_triton.py, which re-runs this file with -k triton in a
subprocess with the variable set: setting it inside a shared pytest session would depend on whether some
other test had already imported triton (triton decides interpret-vs-compile when a kernel is decorated),
and would turn every later @triton.jit into an interpreted function for the rest of the session.
GPU cases (bf16 accuracy, speed/memory) are marked gpu and skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from redi_ds.kernels import (
    FusedHeadOptions,
    sequence_logprobs_from_logits,
    fused_linear_loss,
    fused_sequence_logprobs,
    reference_sequence_logprobs,
    reference_token_logprobs,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", "triton"] if INTERPRET else ["torch"]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bf16 accuracy and speed of the GPU kernels)")

V = 131  # odd; block_v=64 below makes the Triton kernel loop over 3 tiles with a masked tail
H = 24   # not a power of two


def _dtype(impl: str) -> torch.dtype:
    return torch.float64 if impl == "torch" else torch.float32  # the interpreter runs fp32


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-5


def _opts(impl: str, chunk: int = 1024) -> FusedHeadOptions:
    return FusedHeadOptions(impl=impl, chunk_size=chunk, block_v=64)


def _batch(n=3, t=37, h=H, v=V, dtype=torch.float64, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.3 if bias else None
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[0, :9] = -100          # prompt prefix
    labels[-1, t - 6:] = -100     # right padding
    if n > 2:
        labels[1, :3] = -100
        labels[1, t - 2:] = -100
    leaves = [x.to(device=device, dtype=dtype).requires_grad_() for x in (hidden, weight)]
    bl = b.to(device=device, dtype=dtype).requires_grad_() if b is not None else None
    return leaves[0], leaves[1], bl, labels.to(device)


def _as_reference(*xs):
    return [None if x is None else x.detach().double().requires_grad_() for x in xs]


def _assert_close(actual, expected, tol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = expected.abs().max().clamp(min=1e-12)
    err = float((actual - expected).abs().max() / scale)
    assert err <= tol, f"{what}: max relative error {err:.3g} > {tol:.1g}"


def _grads(*xs):
    return [None if x is None else x.grad for x in xs]


# ----------------------------------------------------------------------------------------------- linear loss
@pytest.mark.parametrize("chunk", [7, 1024])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_loss_and_grads_match_reference(impl, chunk):
    dtype = _dtype(impl)
    hidden, weight, bias, labels = _batch(dtype=dtype)
    coeffs = torch.tensor([-0.7, 0.25, 1.3], dtype=torch.float32)
    loss, sums, counts = fused_linear_loss(hidden, weight, labels, coeffs, bias, options=_opts(impl, chunk))
    (loss * 1.7).backward()  # grad_output != 1

    rh, rw, rb = _as_reference(hidden, weight, bias)
    rsums, rcounts = reference_sequence_logprobs(rh, rw, labels, rb)
    rloss = (coeffs.double() * rsums).sum()
    (rloss * 1.7).backward()

    tol = _tol(dtype)
    assert not sums.requires_grad and counts.dtype == torch.long
    assert torch.equal(counts, rcounts)
    _assert_close(loss, rloss, tol, "loss")
    _assert_close(sums, rsums, tol, "sums")
    for name, a, r in zip(("hidden", "weight", "bias"), _grads(hidden, weight, bias), _grads(rh, rw, rb)):
        assert a is not None and a.dtype == dtype and a.shape == r.shape, name
        _assert_close(a, r, 10 * tol, f"d{name}")
    # ignored positions get exactly zero gradient
    assert hidden.grad[labels == -100].abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_loss_without_bias_and_no_grad(impl):
    dtype = _dtype(impl)
    hidden, weight, _, labels = _batch(n=2, t=11, dtype=dtype, bias=False, seed=3)
    coeffs = torch.tensor([0.5, -2.0])
    rsums, _ = reference_sequence_logprobs(*_as_reference(hidden, weight), labels)
    with torch.no_grad():
        loss, sums, _ = fused_linear_loss(hidden, weight, labels, coeffs, options=_opts(impl, 5))
    assert not loss.requires_grad
    _assert_close(loss, (coeffs.double() * rsums).sum(), _tol(dtype), "loss (no grad)")
    _assert_close(sums, rsums, _tol(dtype), "sums (no grad)")


# ------------------------------------------------------------------------------------ post-head transforms
TRANSFORMS = {"cohere-scale": dict(scale=0.0625), "granite-divisor": dict(scale=1 / 8),
              "gemma-softcap": dict(softcap=30.0), "softcap-and-scale": dict(scale=2.0, softcap=5.0)}


def _oracle_logits(h, w, b, scale=1.0, softcap=None):
    """The model's own post-head code, written out here (independent of redi_ds.kernels.transform)."""
    z = torch.nn.functional.linear(h, w, b) * scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


@pytest.mark.parametrize("form", ["one_pass", "two_pass"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("impl", IMPLS)
def test_post_head_transforms_are_exact(impl, name, form):
    """Softcaps and logit scales inside the head, against float64 autograd of the written-out formula: the sums
    and every gradient (the softcap's 1 - tanh^2 factor included). The raw logits have std ~8, so a softcap of 30
    is far from the identity."""
    from redi_ds.kernels import LogitTransform

    dtype = _dtype(impl)
    hidden, weight, bias, labels = _batch(dtype=dtype, seed=4)
    with torch.no_grad():
        weight.mul_(3.3)  # raw logits std ~8
    coeffs = torch.tensor([-0.7, 0.25, 1.3], dtype=torch.float64)
    t = LogitTransform(**TRANSFORMS[name])
    opts = _opts(impl, 7)
    if form == "one_pass":
        loss, sums, _ = fused_linear_loss(hidden, weight, labels, coeffs, bias, options=opts, transform=t)
        (loss * 1.7).backward()
    else:
        sums, _ = fused_sequence_logprobs(hidden, weight, labels, bias, options=opts, transform=t)
        ((coeffs.to(dtype) * sums).sum() * 1.7).backward()
    rh, rw, rb = _as_reference(hidden, weight, bias)
    rsums, _ = sequence_logprobs_from_logits(_oracle_logits(rh, rw, rb, **TRANSFORMS[name]), labels)
    ((coeffs * rsums).sum() * 1.7).backward()
    plain, _ = sequence_logprobs_from_logits(_oracle_logits(rh, rw, rb), labels)
    assert (plain - rsums).abs().max() > 1.0  # the transform matters at this scale
    tol = _tol(dtype)
    _assert_close(sums, rsums, tol, f"sums ({name})")
    for what, a, r in zip(("hidden", "weight", "bias"), _grads(hidden, weight, bias), _grads(rh, rw, rb)):
        _assert_close(a, r, 10 * tol, f"d{what} ({name})")


# ------------------------------------------------------------------------------------ two-pass (DPO/SimPO)
@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_and_grads_match_reference(impl):
    dtype = _dtype(impl)
    hidden, weight, bias, labels = _batch(dtype=dtype, seed=1)
    sums, counts = fused_sequence_logprobs(hidden, weight, labels, bias, options=_opts(impl, 10))
    g = torch.tensor([0.3, -1.1, 2.0], dtype=dtype)
    # a non-linear function of the sums: backward gets one different scalar per sequence
    (sums * g).sum().backward()

    rh, rw, rb = _as_reference(hidden, weight, bias)
    rsums, rcounts = reference_sequence_logprobs(rh, rw, labels, rb)
    (rsums * g.double()).sum().backward()

    tol = _tol(dtype)
    assert sums.requires_grad and torch.equal(counts, rcounts)
    _assert_close(sums, rsums, tol, "sums")
    for name, a, r in zip(("hidden", "weight", "bias"), _grads(hidden, weight, bias), _grads(rh, rw, rb)):
        _assert_close(a, r, 10 * tol, f"d{name}")


def _packed(dtype, flat: bool, seed=2):
    """Three sequences packed in one row, with ignored prompt tokens inside and padding at the end."""
    g = torch.Generator().manual_seed(seed)
    lengths = [13, 9, 17]
    total = sum(lengths) + 4
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((4,), 2)])
    labels = torch.randint(0, V, (total,), generator=g)
    labels[0:4] = -100
    labels[13:16] = -100
    labels[-4:] = -100
    hidden = torch.randn(total, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    if not flat:
        hidden, labels, seq_ids = hidden[None], labels[None], seq_ids[None]
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels, seq_ids


@pytest.mark.parametrize("flat", [False, True], ids=["1xTxH", "TxH"])
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_seq_ids(impl, flat):
    dtype = _dtype(impl)
    hidden, weight, labels, seq_ids = _packed(dtype, flat)
    sums, counts = fused_sequence_logprobs(hidden, weight, labels, seq_ids=seq_ids, options=_opts(impl, 8))
    g = torch.tensor([1.0, -0.5, 0.25], dtype=dtype)
    (sums * g).sum().backward()
    rh, rw = _as_reference(hidden, weight)
    rsums, rcounts = reference_sequence_logprobs(rh, rw, labels, seq_ids=seq_ids)
    (rsums * g.double()).sum().backward()
    assert sums.shape == (3,) and torch.equal(counts, rcounts) and counts.tolist() == [9, 6, 17]
    tol = _tol(dtype)
    _assert_close(sums, rsums, tol, "sums")
    _assert_close(hidden.grad, rh.grad, 10 * tol, "dhidden")
    _assert_close(weight.grad, rw.grad, 10 * tol, "dweight")

    # the single-pass form on the same packed row, with num_seqs given
    hidden.grad = weight.grad = None
    coeffs = torch.tensor([-1.0, 0.5, 2.0])
    loss, lsums, _ = fused_linear_loss(hidden, weight, labels, coeffs, seq_ids=seq_ids, num_seqs=3,
                                       options=_opts(impl, 8))
    loss.backward()
    rh.grad = rw.grad = None
    rsums, _ = reference_sequence_logprobs(rh, rw, labels, seq_ids=seq_ids)
    (coeffs.double() * rsums).sum().backward()
    _assert_close(lsums, rsums, tol, "sums (linear)")
    _assert_close(hidden.grad, rh.grad, 10 * tol, "dhidden (linear)")
    _assert_close(weight.grad, rw.grad, 10 * tol, "dweight (linear)")


# ------------------------------------------------------------------------------ per-token coefficients
@pytest.mark.parametrize("impl", IMPLS)
def test_token_coefficients_match_reference(impl):
    """token_coeffs weigh every position on its own (REDI's divergent negative span goes through this)."""
    dtype = _dtype(impl)
    hidden, weight, bias, labels = _batch(n=4, t=19, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    w[:, :5] = 0.0  # a masked prefix inside the targets
    w = w.to(dtype)
    loss, sums, counts = fused_linear_loss(hidden, weight, labels, bias=bias, token_coeffs=w,
                                           options=_opts(impl, 7))
    (loss * 0.3).backward()
    rh, rw, rb = _as_reference(hidden, weight, bias)
    rtok = reference_token_logprobs(rh, rw, labels, rb)
    rloss = (w.double().reshape(-1) * rtok).sum()
    (rloss * 0.3).backward()
    tol = _tol(dtype)
    _assert_close(loss, rloss, tol, "loss")
    _assert_close(sums, reference_sequence_logprobs(rh, rw, labels, rb)[0], tol, "sums")
    for name, a, r in zip(("hidden", "weight", "bias"), _grads(hidden, weight, bias), _grads(rh, rw, rb)):
        _assert_close(a, r, 10 * tol, f"d{name}")
    with pytest.raises(ValueError, match="exactly one"):
        fused_linear_loss(hidden, weight, labels, torch.ones(4), token_coeffs=w, impl=impl)


# ------------------------------------------------------------------------------------------------- fp16
def _fp16_case(v=4096, h=64, n=2, t=96, seed=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.05
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, :8] = -100
    coeffs = torch.full((n,), 1.0 / 19000)  # one token of a 19k-token trace: REDI-sized
    return hidden, weight, labels, coeffs


def test_fp16_gradients_carry_the_loss_scale():
    """Under fp16 the linear path takes the two-pass form: DeepSpeed's loss scale (2^14 here) only arrives
    in backward, and gradients formed in forward without it flush to zero. Measured against float64, the
    fused fp16 gradients are as good as plain autograd fp16 with the same loss scale."""
    hidden, weight, labels, coeffs = _fp16_case()
    scale = 2.0 ** 14

    def grads(h, w, fn):
        h = h.clone().requires_grad_()
        w = w.clone().requires_grad_()
        (fn(h, w) * scale).backward()
        return h.grad.double() / scale, w.grad.double() / scale

    def fused(h, w):
        return fused_linear_loss(h, w, labels, coeffs, impl="torch")[0]

    def plain(h, w):  # autograd on fp16 logits, the usual HF path
        return (coeffs.to(torch.float32) * reference_sequence_logprobs(h, w, labels)[0].float()).sum()

    exact = grads(hidden, weight, plain)
    f16 = grads(hidden.half(), weight.half(), fused)
    auto = grads(hidden.half(), weight.half(), plain)

    def err(a, b):
        return float((a - b).abs().max() / b.abs().max())

    for i, name in enumerate(("dhidden", "dweight")):
        assert err(f16[i], exact[i]) <= 2 * err(auto[i], exact[i]) + 1e-4, name
    # no gradient entry the float64 reference has is flushed to zero
    flushed = float(((f16[1] == 0) & (exact[1].abs() > 1e-9)).double().mean())
    assert flushed < 0.01, flushed
    # the single-pass form (gradients in forward, fp16, unscaled), which fp16 no longer takes, loses them
    from redi_ds.kernels.engine import HeadSpec, grad_pass, select_tokens

    sel = select_tokens(hidden.half(), weight.half(), labels, None, None)
    _, _, g = grad_pass(hidden.half(), weight.half(), None, sel, coeffs.index_select(0, sel.seq),
                        HeadSpec(FusedHeadOptions(impl="torch")), (True, True, False))
    lost = float(((g.weight == 0) & (exact[1].abs() > 1e-9)).double().mean())
    assert lost > 0.1, lost


# ------------------------------------------------------------------------------------------ memory
def test_backward_scales_the_saved_gradients_in_place():
    """DeepSpeed always passes grad_output = 1/accum: scaling must not allocate a second [V, H] gradient."""
    hidden, weight, bias, labels = _batch(dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = fused_linear_loss(hidden, weight, labels, torch.tensor([0.5, -1.0, 2.0]), bias,
                                       impl="torch")
    (loss * 0.25).backward()
    assert weight.grad.data_ptr() in saved and hidden.grad.data_ptr() in saved and bias.grad.data_ptr() in saved
    rh, rw, rb = _as_reference(hidden, weight, bias)
    (0.25 * (torch.tensor([0.5, -1.0, 2.0]).double() * reference_sequence_logprobs(rh, rw, labels, rb)[0]).sum()
     ).backward()
    _assert_close(weight.grad, rw.grad, 1e-4, "dweight")


def test_auto_chunk_size_rule():
    o = FusedHeadOptions()
    assert o.chunk_size == "auto"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # 256 MiB / (151,936 x 2 bytes) = 883 -> 832 (a multiple of 64) for the bf16 triton block on a GPU
    assert FusedHeadOptions(impl="triton").chunk_for(151936, torch.bfloat16, cuda) == 832
    cpu_rows = FusedHeadOptions(impl="torch").chunk_for(151936, torch.float32, cpu)
    assert cpu_rows == 192  # 128 MiB / (151,936 x 4 bytes) = 220 -> 192
    assert FusedHeadOptions(impl="torch").chunk_for(21, torch.float32, cpu) == 16384  # a character vocabulary
    assert FusedHeadOptions(chunk_size=100).chunk_for(151936, torch.float32, cpu) == 100


# -------------------------------------------------------------------------------------- edges and contract
@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero_loss_and_zero_grads(impl):
    hidden, weight, _, labels = _batch(n=2, t=5, dtype=_dtype(impl), bias=False)
    labels[:] = -100
    loss, sums, counts = fused_linear_loss(hidden, weight, labels, torch.ones(2), impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0 and counts.tolist() == [0, 0] and sums.abs().max() == 0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_blocks_are_bounded_and_prompt_tokens_cost_nothing(monkeypatch):
    """The only [block x V] buffer has at most chunk_size rows, and only non-ignored tokens reach it."""
    import redi_ds.kernels.torch_head as th

    seen = []
    real = th.torch_rows

    def spy(x, *a, **k):
        seen.append(tuple(x.shape))
        return real(x, *a, **k)

    monkeypatch.setattr(th, "torch_rows", spy)
    hidden, weight, _, labels = _batch(dtype=torch.float32, bias=False)
    n_valid = int((labels != -100).sum())
    loss, _, _ = fused_linear_loss(hidden, weight, labels, torch.ones(3), options=FusedHeadOptions(impl="torch",
                                                                                                 chunk_size=16))
    loss.backward()
    assert seen and all(r <= 16 and v == V for r, v in seen)
    assert sum(r for r, _ in seen) == n_valid < labels.numel()


def test_invalid_inputs_raise():
    hidden, weight, _, labels = _batch(n=2, t=5, dtype=torch.float32, bias=False)
    bad = labels.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match="labels must be"):
        fused_sequence_logprobs(hidden, weight, bad, impl="torch")
    with pytest.raises(ValueError, match="coeffs"):
        fused_linear_loss(hidden, weight, labels, torch.ones(3), impl="torch")
    with pytest.raises(ValueError, match="impl"):
        fused_sequence_logprobs(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        FusedHeadOptions(chunk_size=0)
    with pytest.raises(ValueError, match="block_v"):
        FusedHeadOptions(block_v=100)


def test_reference_impl_routes_to_the_oracle(monkeypatch):
    """"reference" is an impl like the others: through impl= or through the options (the trainer's path)."""
    import redi_ds.kernels.fused as fused_mod

    calls = []
    real = fused_mod._reference_token_logprobs
    monkeypatch.setattr(fused_mod, "_reference_token_logprobs", lambda *a: calls.append(1) or real(*a))
    hidden, weight, _, labels = _batch(n=2, t=9, dtype=torch.float64, bias=False, seed=5)
    coeffs = torch.tensor([0.3, -0.9], dtype=torch.float64)
    ref = fused_linear_loss(hidden, weight, labels, coeffs, impl="reference")
    via_options = fused_linear_loss(hidden, weight, labels, coeffs, options=FusedHeadOptions(impl="reference"))
    fused_sequence_logprobs(hidden, weight, labels, options=FusedHeadOptions(impl="reference"))
    assert len(calls) == 3
    fused = fused_linear_loss(hidden, weight, labels, coeffs, options=FusedHeadOptions(impl="torch", chunk_size=4))
    assert len(calls) == 3
    for a in (ref, via_options):
        assert torch.allclose(a[0], fused[0]) and torch.allclose(a[1], fused[1]) and torch.equal(a[2], fused[2])


def test_importing_the_package_does_not_import_triton():
    code = ("import sys, redi_ds, redi_ds.kernels, torch\n"
            "from redi_ds.kernels import fused_sequence_logprobs\n"
            "h = torch.randn(1, 4, 8); w = torch.randn(11, 8); y = torch.randint(0, 11, (1, 4))\n"
            "fused_sequence_logprobs(h, w, y, impl='auto')\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------- GPU
def _redi_coefficients(counts, alpha):
    from redi_ds.losses import REDILoss, StepTotals

    return REDILoss(alpha).coefficients(counts, StepTotals(examples=counts.shape[0] // 2, tokens=0))


def _naive_lp(hidden, weight, labels):
    return reference_sequence_logprobs(hidden, weight, labels)[0]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gpu_bf16_accuracy(impl):
    hidden, weight, _, labels = _batch(n=4, t=300, h=512, v=32003, dtype=torch.bfloat16, bias=False,
                                       device="cuda")
    coeffs = _redi_coefficients((labels != -100).sum(-1), 0.8).cuda()
    loss, sums, _ = fused_linear_loss(hidden, weight, labels, coeffs, options=FusedHeadOptions(impl=impl,
                                                                                             chunk_size=256))
    loss.backward()
    rh, rw = _as_reference(hidden, weight)
    rsums = _naive_lp(rh, rw, labels)
    rloss = (coeffs.double() * rsums).sum()
    rloss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    _assert_close(sums, rsums, 1e-2, "sums (bf16)")
    _assert_close(loss, rloss, 2e-2, "loss (bf16)")
    _assert_close(hidden.grad, rh.grad, 3e-2, "dhidden (bf16)")
    _assert_close(weight.grad, rw.grad, 3e-2, "dweight (bf16)")


@pytest.mark.gpu
@gpu
def test_gpu_triton_peak_memory_is_a_fraction_of_naive():
    """Memory only: speed lives in kernels/bench_fused_head.py and kernels/gpu_check.py, never in a timed test."""
    n, t, h, v = 8, 1024, 1536, 151936
    torch.manual_seed(0)
    hidden = torch.randn(n, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n, t), device="cuda")
    labels[:, :128] = -100
    coeffs = _redi_coefficients((labels != -100).sum(-1), 0.8).cuda()

    def naive():
        return (coeffs * _naive_lp(hidden, weight, labels)).sum()

    def fused():
        return fused_linear_loss(hidden, weight, labels, coeffs, impl="triton")[0]

    def peak(fn):
        fn().backward()  # warm-up / compile
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    m_naive, m_fused = peak(naive), peak(fused)
    assert m_fused < 0.15 * m_naive, f"triton peak {m_fused / 2**20:.0f} MiB vs naive {m_naive / 2**20:.0f} MiB"
