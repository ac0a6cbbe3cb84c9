"""Diffusion objectives: how a clean latent is noised, what the model regresses, the error.

One place for the noising rule and the regression target of each objective (flow
matching, epsilon prediction, v-prediction) and the per-sample error
e = mean over latent elements of (prediction - target)^2 that the losses of
`videodpo.losses` compare. Models (their adapters) and losses both import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OBJECTIVES = ("flow_matching", "epsilon", "v_prediction")


@dataclass
class DiffusionObjective:
    """How a clean latent becomes a noisy one at timestep t, and what the model predicts.

    Flow matching uses a continuous sigma in (0, 1) and the model sees
    `timestep = sigma * num_train_timesteps`. Epsilon / v-prediction use integer
    timesteps and `alphas_cumprod` from the model's DDPM-style scheduler.
    `shift` is the flow-matching time shift sigma' = s sigma / (1 + (s - 1) sigma).
    """

    kind: str = "flow_matching"
    num_train_timesteps: int = 1000
    alphas_cumprod: torch.Tensor | None = None
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective kind must be one of {OBJECTIVES}, got {self.kind!r}")
        if self.kind != "flow_matching" and self.alphas_cumprod is None:
            raise ValueError(f"objective {self.kind!r} needs the scheduler's alphas_cumprod")

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, low: float = 0.0, high: float | None = None
    ) -> torch.Tensor:
        """Timesteps in the model's units: sigma*1000 (flow) or integers (DDPM), drawn
        within [low, high) (default: all of them) with the distribution restricted there:
        flow matching draws u uniformly between the pre-shift values of the bounds."""
        n = self.num_train_timesteps
        high = float(n) if high is None else high
        if self.kind == "flow_matching":
            u_low, u_high = self._unshift(low / n), self._unshift(high / n)
            sigma = u_low + (u_high - u_low) * torch.rand(batch, generator=generator)
            sigma = self.shift * sigma / (1 + (self.shift - 1) * sigma)
            return sigma * n
        return torch.randint(int(math.ceil(low)), int(math.ceil(high)), (batch,), generator=generator).float()

    def _unshift(self, sigma: float) -> float:
        """The u whose shifted value s u / (1 + (s - 1) u) is `sigma`."""
        return sigma / (self.shift - (self.shift - 1) * sigma)

    def _coefficients(self, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with x_t = a x0 + b eps, shaped to broadcast over a latent of `ndim` dims."""
        shape = (-1,) + (1,) * (ndim - 1)
        if self.kind == "flow_matching":
            sigma = (timesteps.float() / self.num_train_timesteps).view(shape)
            return 1 - sigma, sigma
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()].float().view(shape)
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, b = self._coefficients(timesteps, x0.ndim)
        return (a * x0.float() + b * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """flow: v = eps - x0; epsilon: eps; v-prediction: sqrt(abar) eps - sqrt(1-abar) x0."""
        if self.kind == "flow_matching":
            return noise.float() - x0.float()
        if self.kind == "epsilon":
            return noise.float()
        a, b = self._coefficients(timesteps, x0.ndim)
        return a * noise.float() - b * x0.float()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or as it is when it is already fp32 or fp64 (bf16 / fp16 go up)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e = mean over all non-batch elements of (prediction - target)^2, in at least fp32
    (fp64 inputs stay fp64); shape (B,)."""
    sq = (at_least_fp32(prediction) - at_least_fp32(target)) ** 2
    return sq.flatten(1).mean(dim=1)
