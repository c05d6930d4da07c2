"""Loss values against hand-computed numbers."""

import math

import pytest
import torch

from redi_ds.config import LossConfig
from redi_ds.losses import LOSSES, build_loss

# two pairs: chosen rows first, then rejected rows
LOGPS = torch.tensor([-4.0, -9.0, -12.0, -6.0], dtype=torch.float64)
COUNTS = torch.tensor([2, 3, 4, 2])


def test_registry():
    assert set(LOSSES) == {"sft", "redi", "dpo", "simpo"}
    assert [LOSSES[n].needs_reference for n in ("sft", "redi", "dpo", "simpo")] == [False, False, True, False]
    assert LOSSES["sft"].paired is False and LOSSES["redi"].linear and not LOSSES["dpo"].linear


def test_sft_is_token_mean_nll():
    loss, m = build_loss(LossConfig(name="sft"))(LOGPS, COUNTS)
    assert loss.item() == pytest.approx(31.0 / 11.0)  # (4 + 9 + 12 + 6) / (2 + 3 + 4 + 2)


def test_redi_hand_computed():
    loss, m = build_loss(LossConfig(name="redi", alpha=0.8))(LOGPS, COUNTS)
    # pair 1: -(-4/2) + 0.8 * (-12/4) = 2 - 2.4 = -0.4 ; pair 2: -(-9/3) + 0.8 * (-6/2) = 3 - 2.4 = 0.6
    assert loss.item() == pytest.approx((-0.4 + 0.6) / 2)
    assert m["logp_chosen"].item() == pytest.approx((-2.0 - 3.0) / 2)
    assert m["logp_rejected"].item() == pytest.approx((-3.0 - 3.0) / 2)
    assert m["margin"].item() == pytest.approx(((-2 + 3) + (-3 + 3)) / 2)
    alpha0, _ = build_loss(LossConfig(name="redi", alpha=0.0))(LOGPS, COUNTS)
    assert alpha0.item() == pytest.approx((2.0 + 3.0) / 2)  # alpha = 0: SFT on positives, length-normalised


@pytest.mark.parametrize("name", ["sft", "redi"])
def test_linear_coefficients_reproduce_the_loss(name):
    fn = build_loss(LossConfig(name=name, alpha=0.8))
    logps = LOGPS.clone().requires_grad_(True)
    loss, _ = fn(logps, COUNTS)
    loss.backward()
    c = fn.coefficients(COUNTS).double()
    assert (c * LOGPS).sum().item() == pytest.approx(loss.item())
    torch.testing.assert_close(logps.grad, c)  # the coefficient is the gradient of the loss


def test_dpo_hand_computed():
    ref = torch.tensor([-5.0, -8.0, -11.0, -7.0], dtype=torch.float64)
    loss, m = build_loss(LossConfig(name="dpo", beta=0.5))(LOGPS, COUNTS, ref)
    # pair 1: (-4+5) - (-12+11) = 2 ; pair 2: (-9+8) - (-6+7) = -2
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["reward_accuracy"].item() == 0.5
    with pytest.raises(ValueError):
        build_loss(LossConfig(name="dpo"))(LOGPS, COUNTS)


def test_simpo_hand_computed():
    loss, _ = build_loss(LossConfig(name="simpo", beta=2.0, gamma=1.0))(LOGPS, COUNTS)
    # pair 1: 2 * (-2 - -3) - 1 = 1 ; pair 2: 2 * (-3 - -3) - 1 = -1
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected)
