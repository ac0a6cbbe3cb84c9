"""Diffusion objectives: noising and targets against diffusers' schedulers, timestep draws."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from videodpo.objective import DiffusionObjective


def test_flow_matching_noising_and_velocity_target():
    obj = DiffusionObjective("flow_matching")
    x0, eps = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t = torch.tensor([250.0, 900.0])
    xt = obj.add_noise(x0, eps, t)
    torch.testing.assert_close(xt[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(xt[1], 0.1 * x0[1] + 0.9 * eps[1])
    torch.testing.assert_close(obj.target(x0, eps, t), eps - x0)
    ts = DiffusionObjective("flow_matching", shift=3.0).sample_timesteps(
        1000, torch.Generator().manual_seed(0)
    )
    assert 0 < ts.min() and ts.max() < 1000 and ts.mean() > 600  # a shift > 1 favours high noise


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddpm_objectives_match_diffusers_scheduler(kind):
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=kind
    )
    obj = DiffusionObjective(kind, alphas_cumprod=sched.alphas_cumprod)
    x0, eps = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t = torch.tensor([10, 700])
    torch.testing.assert_close(obj.add_noise(x0, eps, t.float()), sched.add_noise(x0, eps, t))
    expect = eps if kind == "epsilon" else sched.get_velocity(x0, eps, t)
    torch.testing.assert_close(obj.target(x0, eps, t.float()), expect)


@pytest.mark.parametrize("kind", ["flow_matching", "epsilon"])
def test_timesteps_drawn_within_a_range_keep_the_distribution_there(kind):
    """The whole range draws what it always drew; a sub-range (one Wan2.2 expert's)
    draws only inside it, with the shifted distribution restricted, not clipped."""
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    obj = DiffusionObjective(kind, shift=5.0, alphas_cumprod=alphas if kind != "flow_matching" else None)
    full = obj.sample_timesteps(20000, torch.Generator().manual_seed(0))
    if kind == "flow_matching":  # the plain draw: sigma = shift(u), u uniform
        u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(full, 5 * u / (1 + 4 * u) * 1000, rtol=0, atol=0)
    high = obj.sample_timesteps(20000, torch.Generator().manual_seed(1), 875.0, 1000.0)
    low = obj.sample_timesteps(20000, torch.Generator().manual_seed(2), 0.0, 875.0)
    assert high.min() >= 875 and high.max() < 1000 and low.min() >= 0 and low.max() < 875
    share = (full >= 875).float().mean()  # the sub-ranges hold the full draw's distribution there
    for part, inside in [(high, full[full >= 875]), (low, full[full < 875])]:
        assert abs(part.median() - inside.median()) < 8, (part.median(), inside.median(), share)
