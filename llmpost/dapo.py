"""DAPO's pieces as plain functions: group advantages, the clipped token loss, overlong
shaping and dynamic sampling (docs/design.md section 6).

The training loop that uses them is `llmpost.dapo_trainer`; nothing here knows about
models, ranks or tokenizers, so each piece is tested on its own against hand-computed
values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

ADVANTAGE_EPS = 1e-6


def mini_batch_indices(n: int, parts: int) -> list[list[int]]:
    """Contiguous, near-equal index chunks of a batch of `n` (some may be empty)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = (R_i - mean(R)) / (std(R) + 1e-6) within each group of `group_size`.

    `rewards` has shape `(N * G,)` with the G responses of a prompt next to each other;
    std is unbiased (as verl and TRL compute it). A group of one has advantage 0.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    std = grouped.std(dim=1, unbiased=True, keepdim=True)
    return ((grouped - mean) / (std + ADVANTAGE_EPS)).view(-1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    num_tokens: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clip-higher PPO loss averaged over every unmasked token of the batch.

    Token loss: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old_logp).
    `logp`, `old_logp`, `mask` are `(B, T)`; `advantages` is `(B,)`, one per sequence.
    `dual_clip=c` (verl uses 3) caps the loss of negative-advantage tokens at -c A.
    `num_tokens` replaces the local token count as the denominator (a mini-batch split
    over micro-batches or ranks still averages over all its tokens).
    `token_weights` `(B, T)` multiplies each token's loss (truncated importance sampling,
    `tis_weights`); they are constants, not differentiated.
    """
    per_token = policy_token_losses(logp, old_logp, advantages, eps_low, eps_high, dual_clip)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    mask = mask.to(per_token.dtype)
    denom = mask.sum() if num_tokens is None else num_tokens
    return (per_token * mask).sum() / torch.clamp(torch.as_tensor(denom, dtype=per_token.dtype), min=1.0)


def policy_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """The unreduced `(B, T)` token losses of `policy_loss`."""
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.minimum(loss, -dual_clip * adv)
        loss = torch.where(adv < 0, capped, loss)
    return loss


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate "k3": exp(d) - d - 1 with d = ref_logp - logp
    (non-negative, unbiased for samples from pi; the estimator verl calls `low_var_kl`)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights min(p_old / p_engine, C), per token.

    The engine sampled the tokens, but the loss treats them as drawn by the trainer's
    policy at rollout time (`old_logp`); the ratio corrects the difference of the two
    implementations and the cap C bounds its variance (verl's and TRL's TIS)."""
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    return torch.clamp(torch.exp(old_logp - engine_logp), max=cap)


def logprob_mismatch(engine_logp: torch.Tensor, policy_logp: torch.Tensor) -> dict[str, float]:
    """The train-inference gap over sampled tokens (1-D tensors, one entry per token):
    mean and max |log p_engine - log p_policy|, and the k3 estimate of
    KL(pi_engine || pi_policy) (the tokens were drawn by the engine). Also `tokens`."""
    if engine_logp.shape != policy_logp.shape:
        raise ValueError(f"engine and policy log-probs differ in shape: "
                         f"{tuple(engine_logp.shape)} vs {tuple(policy_logp.shape)}")
    if engine_logp.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "kl_k3": 0.0, "tokens": 0}
    gap = (engine_logp.double() - policy_logp.double())
    return {
        "mean_abs": float(gap.abs().mean()), "max_abs": float(gap.abs().max()),
        "kl_k3": float(kl_k3(engine_logp.double(), policy_logp.double()).mean()),
        "tokens": engine_logp.numel(),
    }


def clipped_tokens(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
    eps_low: float = 0.2, eps_high: float = 0.28,
) -> torch.Tensor:
    """Boolean `(B, T)`: tokens whose ratio was clipped (the clipped term was active)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    return ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0
) -> torch.Tensor:
    """Soft overlong punishment: min(0, -(L - (Lmax - Lb)) / Lb) * factor.

    Zero up to `max_len - buffer_len`, then falls linearly to `-factor` at `max_len`
    (generation stops there, so it does not go further in practice).
    """
    if buffer_len <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    exceed = lengths.float() - (max_len - buffer_len)
    return torch.clamp(-exceed / buffer_len, max=0.0) * factor


# ----------------------------------------------------------------------------- sampling


@dataclass
class SampledGroup:
    """The G responses to one prompt and their rewards; `data` is whatever the caller keeps."""

    rewards: list[float]
    data: Any = None

    @property
    def informative(self) -> bool:
        return max(self.rewards) != min(self.rewards)


@dataclass
class DynamicSamplingResult:
    groups: list[SampledGroup]
    rounds: int
    generated_groups: int
    cap_hit: bool
    dropped: list[SampledGroup] = field(default_factory=list)

    @property
    def kept_share(self) -> float:
        return len(self.groups) / max(1, self.generated_groups)


def dynamic_sample(
    sample_round: Callable[[int], Sequence[SampledGroup]],
    num_groups: int,
    max_extra_rounds: int,
    keep_going: Callable[[bool], bool] | None = None,
) -> DynamicSamplingResult:
    """Call `sample_round(round_index)` until `num_groups` informative groups are kept.

    Round 0 is the normal rollout; at most `max_extra_rounds` more rounds follow. When the
    cap is hit the batch is returned short (possibly empty) with a warning saying so.
    `keep_going(needs_more)` decides whether another round runs; on several ranks it is
    "does any rank need more" so that every rank calls the (collective) generator equally.
    """
    keep_going = keep_going or (lambda needs_more: needs_more)
    kept: list[SampledGroup] = []
    dropped: list[SampledGroup] = []
    generated = 0
    rounds = 0
    while rounds <= max_extra_rounds and keep_going(len(kept) < num_groups):
        groups = list(sample_round(rounds))
        rounds += 1
        generated += len(groups)
        for g in groups:
            (kept if g.informative and len(kept) < num_groups else dropped).append(g)
    cap_hit = len(kept) < num_groups
    if cap_hit:
        logger.warning(
            "dynamic sampling: cap of %d extra rounds hit with %d of %d informative groups "
            "(%d generated); training on the short batch. Raise dapo.max_extra_rounds or "
            "the sampling temperature if this repeats.",
            max_extra_rounds, len(kept), num_groups, generated,
        )
    return DynamicSamplingResult(kept, rounds, generated, cap_hit, dropped)
