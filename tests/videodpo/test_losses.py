"""reg_dpo_loss against a hand-written formula and its hand-derived gradient; objective targets."""

from __future__ import annotations

import math

import pytest
import torch

from videodpo.losses import dpo_accuracy_and_margin, loss_weights, preference_gap, reg_dpo_loss
from videodpo.objective import per_sample_error


def _hand_loss(pw, pl, rw, rl, beta, lam):
    total = 0.0
    for a, b, c, e in zip(pw, pl, rw, rl):
        d = (a - c) - (b - e)
        total += -math.log(1.0 / (1.0 + math.exp((beta / 2) * d))) + lam * a
    return total / len(pw)


@pytest.mark.parametrize("beta,lam", [(500.0, 1.0), (2000.0, 0.0), (50.0, 0.5)])
def test_reg_dpo_loss_matches_hand_formula_and_gradient(beta, lam):
    g = torch.Generator().manual_seed(1)
    pw, pl, rw, rl = (
        0.1 + 0.01 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4)
    )
    pw, pl = pw.requires_grad_(), pl.requires_grad_()
    rw, rl = rw.requires_grad_(), rl.requires_grad_()
    loss, metrics = reg_dpo_loss(pw, pl, rw, rl, beta=beta, sft_weight=lam)
    expect = _hand_loss(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), beta, lam)
    assert loss.item() == pytest.approx(expect, rel=1e-6)

    loss.backward()
    d = [
        (a - c) - (b - e) for a, b, c, e in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist())
    ]
    sig = [1 / (1 + math.exp(-(beta / 2) * x)) for x in d]  # d/dd of -log sigmoid(-(b/2) d) / (b/2)
    n = len(d)
    for i in range(n):
        assert pw.grad[i].item() == pytest.approx(((beta / 2) * sig[i] + lam) / n, rel=1e-5)
        assert pl.grad[i].item() == pytest.approx(-(beta / 2) * sig[i] / n, rel=1e-5)
        assert rw.grad[i].item() == pytest.approx(-(beta / 2) * sig[i] / n, rel=1e-5)
        assert rl.grad[i].item() == pytest.approx((beta / 2) * sig[i] / n, rel=1e-5)

    assert metrics["margin"] == pytest.approx(-sum(d) / n, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(sum(x < 0 for x in d) / n)
    assert metrics["sft"] == pytest.approx(sum(pw.tolist()) / n, rel=1e-6)


def test_sft_and_dpo_are_settings_of_the_same_loss():
    pw, pl, rw, rl = (
        torch.tensor([0.3, 0.2]),
        torch.tensor([0.5, 0.1]),
        torch.tensor([0.4, 0.2]),
        torch.tensor([0.4, 0.3]),
    )
    dpo_w, sft_w = loss_weights("sft", 1.0)
    sft_loss, metrics = reg_dpo_loss(
        pw, None, None, None, beta=100.0, sft_weight=sft_w, dpo_weight=dpo_w
    )
    assert sft_loss.item() == pytest.approx(0.25)
    assert "accuracy" not in metrics
    dpo_w, sft_w = loss_weights("dpo", 1.0)
    dpo_loss, _ = reg_dpo_loss(pw, pl, rw, rl, beta=100.0, sft_weight=sft_w, dpo_weight=dpo_w)
    assert dpo_loss.item() == pytest.approx(
        _hand_loss(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), 100.0, 0.0), rel=1e-6
    )
    with pytest.raises(ValueError):
        loss_weights("ppo", 1.0)


def test_per_sample_error_is_mean_over_latent_elements():
    pred, target = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    expect = torch.stack([((pred[i] - target[i]) ** 2).mean() for i in range(3)])
    torch.testing.assert_close(per_sample_error(pred, target), expect)


@pytest.mark.parametrize("beta,lam", [(500.0, 1.0), (2000.0, 0.5)])
def test_reg_dpo_loss_keeps_fp64_to_1e9_against_hand_formula_and_gradient(beta, lam):
    """fp64 errors give an fp64 loss whose value and gradient equal the formula in Python
    floats (fp64) to 1e-9 relative; an fp32 cast inside would miss by about 1e-6."""
    g = torch.Generator().manual_seed(2)
    pw, pl, rw, rl = (
        (0.1 + 0.01 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)
    )
    loss, _ = reg_dpo_loss(pw, pl, rw, rl, beta=beta, sft_weight=lam)
    assert loss.dtype == torch.float64
    n = 6
    d = [(a - c) - (b - e) for a, b, c, e in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist())]
    # -log sigmoid(-x) = log(1 + exp(x)), x = (beta / 2) d
    expect = sum(math.log1p(math.exp((beta / 2) * x)) + lam * a for x, a in zip(d, pw.tolist())) / n
    assert abs(loss.item() - expect) <= 1e-9 * abs(expect)
    loss.backward()
    sig = [1 / (1 + math.exp(-(beta / 2) * x)) for x in d]
    for i in range(n):
        want = {
            "pw": ((beta / 2) * sig[i] + lam) / n, "pl": -(beta / 2) * sig[i] / n,
            "rw": -(beta / 2) * sig[i] / n, "rl": (beta / 2) * sig[i] / n,
        }
        for name, t in (("pw", pw), ("pl", pl), ("rw", rw), ("rl", rl)):
            assert t.grad.dtype == torch.float64
            assert abs(t.grad[i].item() - want[name]) <= 1e-9 * abs(want[name]), (name, i)


def test_per_sample_error_keeps_fp64_and_lifts_bf16():
    pred, target = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    assert per_sample_error(pred, target).dtype == torch.float64
    assert per_sample_error(pred.bfloat16(), target.bfloat16()).dtype == torch.float32


def test_accuracy_and_margin_from_the_preference_gap():
    pw, pl = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    rw, rl = torch.tensor([1.5, 2.0, 2.0]), torch.tensor([1.0, 2.5, 1.0])
    d = preference_gap(pw, pl, rw, rl)
    assert d.tolist() == [-1.5, 0.5, 1.0]
    accuracy, margin = dpo_accuracy_and_margin(d)
    assert accuracy == pytest.approx(1 / 3) and margin == pytest.approx(0.0)
    _, metrics = reg_dpo_loss(pw, pl, rw, rl, beta=1.0, sft_weight=0.0)
    assert (metrics["accuracy"], metrics["margin"]) == (accuracy, margin)
