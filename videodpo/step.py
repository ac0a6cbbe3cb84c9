"""One optimizer step of SFT / Diffusion-DPO / Reg-DPO on a batch of preference pairs.

`pair_errors` draws one timestep and noise per pair (shared by its two clips, and by
the pair and cp ranks of one data rank) and returns the per-sample errors of policy
and reference; `training_step` feeds them to `videodpo.losses.reg_dpo_loss`, runs
backward over `train.grad_accum` micro-batches (FSDP2 reduce-scatters only after the
last), clips and steps. A step with a non-finite loss or gradient is skipped on all
ranks together and counted; too many abort the run.

For benchmarks and tools: `build_training_step(cfg, adapter=None) -> (step_fn, state)`,
where `step_fn(batch_or_list_of_micro_batches)` runs one full optimizer step and
returns its metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from common.errors import UserError
from common.fsdp import drop_unsynced_gradients
from videodpo.config import RunConfig
from videodpo.data.pairs import PairBatch
from videodpo.losses import loss_weights, reg_dpo_loss
from videodpo.models import VideoModelAdapter
from videodpo.models.experts import EXPERT_NAMES, TimestepExperts
from videodpo.state import TrainingState, build_training_state

logger = logging.getLogger(__name__)


def _autocast(state: TrainingState) -> contextlib.AbstractContextManager:
    if state.cfg.train.mixed_precision == "bf16":
        return torch.autocast(device_type=state.layout.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pair_errors(state: TrainingState, batch: PairBatch) -> tuple[torch.Tensor | None, ...]:
    """Per-sample errors (policy_w, policy_l, ref_w, ref_l) of one micro-batch, each
    `(pairs,)`; rejected and reference are None for SFT. Timestep and noise are drawn
    once per pair and shared by its two clips."""
    adapter, layout = state.adapter, state.layout
    batch = batch.to(layout.device)
    pairs = batch.chosen.shape[0]
    t = adapter.objective.sample_timesteps(pairs, state.generator, *state.timestep_range).to(layout.device)
    noise = torch.randn(batch.chosen.shape, generator=state.generator).to(layout.device, batch.chosen.dtype)
    sft = state.cfg.loss.kind == "sft"
    clips, cond, t, noise = _this_ranks_samples(batch, t, noise, sft, layout.pair_size, layout.pair_rank)
    with _autocast(state):
        policy_errors = adapter.training_error(state.policy, clips, noise, t, cond)
    if sft:
        return policy_errors, None, None, None
    with torch.no_grad(), state.reference_context(), _autocast(state):
        reference = state.reference if state.reference is not None else state.policy
        reference_errors = adapter.training_error(reference, clips, noise, t, cond)
    if layout.pair_size == 2:  # [preferred; rejected] from the two pair ranks
        policy_errors = layout.gather_pair(policy_errors)
        reference_errors = layout.gather_pair(reference_errors.detach())
    return policy_errors[:pairs], policy_errors[pairs:], reference_errors[:pairs], reference_errors[pairs:]


def _this_ranks_samples(
    batch: PairBatch, t: torch.Tensor, noise: torch.Tensor, sft: bool, pair_size: int, pair_rank: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(clips, conditions, timesteps, noise) this rank runs: the preferred clips for SFT;
    with pair parallelism its own side of each pair (rank 0 preferred, rank 1 rejected);
    otherwise both sides, `[preferred; rejected]`, each pair's t and noise twice."""
    if sft:
        return batch.chosen, batch.cond, t, noise
    if pair_size == 2:
        return (batch.chosen if pair_rank == 0 else batch.rejected), batch.cond, t, noise
    cond = {k: torch.cat([v, v]) for k, v in batch.cond.items()}
    return torch.cat([batch.chosen, batch.rejected]), cond, torch.cat([t, t]), torch.cat([noise, noise])


def training_step(state: TrainingState, batches: list[PairBatch]) -> dict[str, float]:
    """One optimizer step over `len(batches)` accumulated micro-batches."""
    cfg = state.cfg
    dpo_w, sft_w = loss_weights(cfg.loss.kind, cfg.loss.sft_weight)
    state.optimizer.zero_grad(set_to_none=True)
    if isinstance(state.policy, TimestepExperts):
        state.policy.reset_routed()
    sums: dict[str, float] = {}
    finite = True
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        if state.layout.fsdp:  # reduce-scatter once, after the last micro-batch's backward
            state.policy.set_requires_gradient_sync(last)
        pw, pl, rw, rl = pair_errors(state, batch)
        loss, metrics = reg_dpo_loss(pw, pl, rw, rl, beta=cfg.loss.beta, sft_weight=sft_w, dpo_weight=dpo_w)
        # All ranks skip a backward together: one rank's lone backward would wait in
        # FSDP's reduce-scatter (or the pair gather) for ranks that never join.
        finite = state.layout.all_ranks_agree(finite and math.isfinite(metrics["loss"]))
        if finite:
            (loss / len(batches)).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / len(batches)
    state.layout.reduce_gradients(state.policy)
    _drop_idle_expert_gradients(state)
    params = [p for p in state.policy.parameters() if p.requires_grad]
    grad_norm = float("nan")
    if finite:
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = math.isfinite(grad_norm)
    finite = state.layout.all_ranks_agree(finite)
    if finite:
        state.optimizer.step()
        state.scheduler.step()
    else:
        state.optimizer.zero_grad(set_to_none=True)
        if state.layout.fsdp:
            drop_unsynced_gradients(state.policy)
        state.nonfinite += 1
        logger.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", state.step + 1, state.nonfinite)
        if state.nonfinite > cfg.train.max_nonfinite:
            raise UserError(
                f"{state.nonfinite} steps had a non-finite loss or gradient (train.max_nonfinite="
                f"{cfg.train.max_nonfinite}); lower optim.lr or loss.beta, or use train.mixed_precision=no"
            )
    state.step += 1
    sums.update(grad_norm=grad_norm, lr=state.scheduler.get_last_lr()[0], nonfinite_steps=float(state.nonfinite))
    return sums


def _drop_idle_expert_gradients(state: TrainingState) -> None:
    """A two-expert policy: the expert that no sample of this step reached, on any rank,
    takes no optimizer step (lockstep left it exact zeros, which AdamW would still act on)."""
    policy = state.policy
    if not isinstance(policy, TimestepExperts):
        return
    counts = torch.tensor([float(policy.routed[n]) for n in EXPERT_NAMES], device=state.layout.device)
    if state.layout.world_size > 1:
        dist.all_reduce(counts)
    for name, count in zip(EXPERT_NAMES, counts.tolist()):
        if count == 0 and name in policy.experts:
            for p in policy.experts[name].parameters():
                p.grad = None


def build_training_step(
    cfg: RunConfig, adapter: VideoModelAdapter | None = None
) -> tuple[Callable[[PairBatch | list[PairBatch]], dict[str, float]], TrainingState]:
    """`(step_fn, state)`: `step_fn(batch)` runs one full optimizer step (policy and
    reference forward, backward, clip, AdamW) with the layout of `cfg.parallel`."""
    state = build_training_state(cfg, adapter)

    def step_fn(batch: PairBatch | list[PairBatch]) -> dict[str, float]:
        return training_step(state, batch if isinstance(batch, list) else [batch])

    return step_fn, state
