"""The SFT / DPO / Reg-DPO losses of docs/design.md section 2, on per-sample errors.

The errors e come from `videodpo.objective` (noising rule, target, and
e = mean over latent elements of (prediction - target)^2); the preference loss is

    d     = (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))
    L_dpo = -log sigmoid(-(beta / 2) d)
    L     = dpo_weight * L_dpo + sft_weight * e_theta(w)

`sft_weight = 0` is plain Diffusion/Flow-DPO, `dpo_weight = 0` is SFT on the preferred
samples, both on is Reg-DPO.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F

from videodpo.objective import at_least_fp32

LossKind = Literal["sft", "dpo", "reg_dpo"]  # loss.kind
LOSS_KINDS: tuple[str, ...] = typing.get_args(LossKind)


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
        accuracy, margin = dpo_accuracy_and_margin(d)
        metrics.update(
            dpo=dpo.mean().item(),
            margin=margin,
            accuracy=accuracy,
            gap_chosen=gap_w.mean().item(),
            gap_rejected=gap_l.mean().item(),
            error_rejected=policy_l.float().mean().item(),
        )
    metrics["loss"] = loss.mean().item()
    return loss, metrics


def preference_gap(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
                   ref_l: torch.Tensor) -> torch.Tensor:
    """d = (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) per sample: negative where the
    policy has moved towards the chosen sample more than towards the rejected one."""
    return (policy_w - ref_w) - (policy_l - ref_l)


def dpo_accuracy_and_margin(d: torch.Tensor) -> tuple[float, float]:
    """(share of samples with d < 0, mean of -d): how often and by how much the policy
    prefers the chosen sample, relative to the reference."""
    return (d < 0).float().mean().item(), (-d).mean().item()


def loss_weights(kind: str, sft_weight: float) -> tuple[float, float]:
    """(dpo_weight, sft_weight) for a loss kind: sft, dpo (Flow/Diffusion-DPO) or reg_dpo."""
    if kind == "sft":
        return 0.0, 1.0
    if kind == "dpo":
        return 1.0, 0.0
    if kind == "reg_dpo":
        return 1.0, sft_weight
    raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
