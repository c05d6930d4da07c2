"""Loss values against hand-computed numbers, and the step objective's independence of the batch split."""

import math

import pytest
import torch

from redi_ds.losses import loss_config
from redi_ds.losses import LOSSES, StepTotals, build_loss

# two pairs: chosen rows first, then rejected rows
LOGPS = torch.tensor([-4.0, -9.0, -12.0, -6.0], dtype=torch.float64)
COUNTS = torch.tensor([2, 3, 4, 2])
ONE_STEP = StepTotals(examples=2, tokens=11)  # this micro batch is the whole step


def test_registry():
    assert set(LOSSES) == {"sft", "redi", "dpo", "simpo", "distill"}
    assert [LOSSES[n].needs_reference for n in ("sft", "redi", "dpo", "simpo")] == [False, False, True, False]
    assert [n for n in LOSSES if LOSSES[n].needs_teacher] == ["distill"]
    assert LOSSES["sft"].paired is False and LOSSES["redi"].linear and not LOSSES["dpo"].linear


def test_sft_is_a_token_mean_over_the_step():
    fn = build_loss(loss_config("sft"))
    assert fn(LOGPS, COUNTS, StepTotals(examples=4, tokens=11)).item() == pytest.approx(31.0 / 11.0)
    # the same rows as one micro batch of a step with 40 response tokens: their share is 31 / 40
    assert fn(LOGPS, COUNTS, StepTotals(examples=16, tokens=40)).item() == pytest.approx(31.0 / 40.0)


def test_redi_hand_computed():
    fn = build_loss(loss_config("redi", alpha=0.8))
    loss = fn(LOGPS, COUNTS, ONE_STEP)
    # pair 1: -(-4/2) + 0.8 * (-12/4) = 2 - 2.4 = -0.4 ; pair 2: -(-9/3) + 0.8 * (-6/2) = 3 - 2.4 = 0.6
    assert loss.item() == pytest.approx((-0.4 + 0.6) / 2)
    m = fn.metrics(LOGPS, COUNTS)
    assert m["logp_chosen"].item() == pytest.approx((-2.0 - 3.0) / 2)
    assert m["logp_rejected"].item() == pytest.approx((-3.0 - 3.0) / 2)
    assert m["margin"].item() == pytest.approx(((-2 + 3) + (-3 + 3)) / 2)
    alpha0 = build_loss(loss_config("redi", alpha=0.0))(LOGPS, COUNTS, ONE_STEP)
    assert alpha0.item() == pytest.approx((2.0 + 3.0) / 2)  # alpha = 0: SFT on positives, length-normalised
    # two pairs of a step of 8 pairs: their share is the sum of their terms / 8
    assert fn(LOGPS, COUNTS, StepTotals(examples=8, tokens=0)).item() == pytest.approx((-0.4 + 0.6) / 8)


@pytest.mark.parametrize("name", ["sft", "redi"])
def test_linear_coefficients_are_the_gradient(name):
    fn = build_loss(loss_config(name))
    logps = LOGPS.clone().requires_grad_(True)
    loss = fn(logps, COUNTS, ONE_STEP)
    loss.backward()
    c = fn.coefficients(COUNTS, ONE_STEP).double()
    assert (c * LOGPS).sum().item() == pytest.approx(loss.item())
    torch.testing.assert_close(logps.grad, c)


def test_dpo_hand_computed():
    ref = torch.tensor([-5.0, -8.0, -11.0, -7.0], dtype=torch.float64)
    fn = build_loss(loss_config("dpo", beta=0.5))
    loss = fn(LOGPS, COUNTS, ONE_STEP, ref)
    # pair 1: (-4+5) - (-12+11) = 2 ; pair 2: (-9+8) - (-6+7) = -2
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected)
    assert fn.metrics(LOGPS, COUNTS, ref)["reward_accuracy"].item() == 0.5
    with pytest.raises(ValueError):
        fn(LOGPS, COUNTS, ONE_STEP)


def test_simpo_hand_computed():
    loss = build_loss(loss_config("simpo", beta=2.0, gamma=1.0))(LOGPS, COUNTS, ONE_STEP)
    # pair 1: 2 * (-2 - -3) - 1 = 1 ; pair 2: 2 * (-3 - -3) - 1 = -1
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected)


def _step_objective(fn, logps, counts, ref, splits):
    """Sum of the shares of a step cut into micro batches of the given example counts (paired: pairs)."""
    paired = fn.paired
    n = logps.shape[0] // 2 if paired else logps.shape[0]
    totals = StepTotals(examples=n, tokens=int(counts.sum()))
    out, start = 0.0, 0
    for size in splits:
        rows = torch.arange(start, start + size)
        rows = torch.cat([rows, rows + n]) if paired else rows
        out += float(fn(logps[rows], counts[rows], totals, None if ref is None else ref[rows]))
        start += size
    return out


@pytest.mark.parametrize("name", ["sft", "redi", "dpo", "simpo"])
def test_step_objective_does_not_depend_on_the_split(name):
    """8 examples of very different lengths: one micro batch of 8, 2 x 4, 4 x 2, 8 x 1 give the same objective.
    Averaging per-micro-batch token means (what DeepSpeed does with an unnormalised loss) does not, for SFT."""
    g = torch.Generator().manual_seed(0)
    s = 16 if name != "sft" else 8
    counts = torch.tensor([3, 400, 17, 90, 1, 250, 33, 8] * (2 if s == 16 else 1))
    logps = -counts.double() * (0.5 + torch.rand(s, generator=g, dtype=torch.float64))
    ref = logps + torch.randn(s, generator=g, dtype=torch.float64)
    fn = build_loss(loss_config(name))
    values = [_step_objective(fn, logps, counts, ref, splits) for splits in ([8], [4, 4], [2] * 4, [1] * 8)]
    assert values == pytest.approx([values[0]] * 4, rel=1e-12)
    if name == "sft":
        means = [float(-logps[i:i + 1].sum() / counts[i:i + 1].sum()) for i in range(8)]
        assert sum(means) / 8 != pytest.approx(values[0], rel=1e-2)  # the old per-micro-batch mean differs
