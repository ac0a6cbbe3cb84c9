"""Diffusion objectives and the SFT / DPO / Reg-DPO losses of DESIGN.md section 2.

One place for the noising rule and the regression target of each objective
(flow matching, epsilon prediction, v-prediction), the per-sample error
e = mean over latent elements of (prediction - target)^2, and the preference loss
on per-sample errors:

    d     = (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))
    L_dpo = -log sigmoid(-(beta / 2) d)
    L     = dpo_weight * L_dpo + sft_weight * e_theta(w)

`sft_weight = 0` is plain Diffusion/Flow-DPO, `dpo_weight = 0` is SFT on the preferred
samples, both on is Reg-DPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("flow_matching", "epsilon", "v_prediction")
LOSS_KINDS = ("sft", "dpo", "reg_dpo")


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

    def predict_x0(self, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by a prediction (for one-step evaluation)."""
        a, b = self._coefficients(timesteps, noisy.ndim)
        noisy, prediction = noisy.float(), prediction.float()
        if self.kind == "flow_matching":
            return noisy - b * prediction
        if self.kind == "epsilon":
            return (noisy - b * prediction) / a.clamp_min(1e-8)
        return a * noisy - b * prediction


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or as it is when it is already fp32 or fp64 (bf16 / fp16 go up)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e = mean over all non-batch elements of (prediction - target)^2, in at least fp32
    (fp64 inputs stay fp64); shape (B,)."""
    sq = (at_least_fp32(prediction) - at_least_fp32(target)) ** 2
    return sq.flatten(1).mean(dim=1)


def reg_dpo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor | None,
    ref_w: torch.Tensor | None,
    ref_l: torch.Tensor | None,
    beta: float,
    sft_weight: float,
    dpo_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reg-DPO on per-sample errors (each `(B,)`): the batch mean of L_dpo + lambda e_theta(w).

    With `dpo_weight=0` (SFT) the rejected and reference errors may be None. Metrics:
    `loss`, `dpo` (mean L_dpo), `sft` (mean e_theta(w)), `margin` (mean of -d),
    `accuracy` (share with d < 0), and the reward-style error gaps of each side.
    Computed in at least fp32; fp64 errors keep fp64 (and so do the loss and gradients).
    """
    per_sample, metrics = reg_dpo_sample_losses(policy_w, policy_l, ref_w, ref_l, beta,
                                                sft_weight, dpo_weight)
    return per_sample.mean(), metrics


def reg_dpo_sample_losses(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor | None,
    ref_w: torch.Tensor | None,
    ref_l: torch.Tensor | None,
    beta: float,
    sft_weight: float,
    dpo_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`reg_dpo_loss` before the batch mean: L_dpo + lambda e_theta(w) per sample, `(B,)`,
    with the same batch-mean metrics (what the data regularizer needs as its target)."""
    sft = at_least_fp32(policy_w)
    metrics: dict[str, float] = {"sft": sft.mean().item()}
    loss = sft_weight * sft
    if dpo_weight != 0:
        if policy_l is None or ref_w is None or ref_l is None:
            raise ValueError("a DPO term needs the rejected and the reference errors")
        gap_w = sft - at_least_fp32(ref_w)
        gap_l = at_least_fp32(policy_l) - at_least_fp32(ref_l)
        d = gap_w - gap_l
        dpo = -F.logsigmoid(-(beta / 2) * d)
        loss = loss + dpo_weight * dpo
        metrics.update(
            dpo=dpo.mean().item(),
            margin=(-d).mean().item(),
            accuracy=(d < 0).float().mean().item(),
            gap_chosen=gap_w.mean().item(),
            gap_rejected=gap_l.mean().item(),
            error_rejected=policy_l.float().mean().item(),
        )
    metrics["loss"] = loss.mean().item()
    return loss, metrics


def loss_weights(kind: str, sft_weight: float) -> tuple[float, float]:
    """(dpo_weight, sft_weight) for a loss kind: sft, dpo (Flow/Diffusion-DPO) or reg_dpo."""
    if kind == "sft":
        return 0.0, 1.0
    if kind == "dpo":
        return 1.0, 0.0
    if kind == "reg_dpo":
        return 1.0, sft_weight
    raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
