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


def pair_errors(state: TrainingState, batch: PairBatch) -> tuple[torch.Tensor, ...]:
    """Per-sample errors (policy_w, policy_l, ref_w, ref_l) of one micro-batch; rejected
    and reference are None for SFT. Timestep and noise are shared within a pair."""
    adapter, objective, layout = state.adapter, state.adapter.objective, state.layout
    batch = batch.to(layout.device)
    b = batch.chosen.shape[0]
    t = objective.sample_timesteps(b, state.generator, *state.timestep_range).to(layout.device)
    noise = torch.randn(batch.chosen.shape, generator=state.generator).to(layout.device, batch.chosen.dtype)
    sft_only = state.cfg.loss.kind == "sft"
    if sft_only:
        x, cond, tt, nn_ = batch.chosen, batch.cond, t, noise
    elif layout.pair_size == 2:
        x = batch.chosen if layout.pair_rank == 0 else batch.rejected
        cond, tt, nn_ = batch.cond, t, noise
    else:
        x = torch.cat([batch.chosen, batch.rejected])
        cond = {k: torch.cat([v, v]) for k, v in batch.cond.items()}
        tt, nn_ = torch.cat([t, t]), torch.cat([noise, noise])
    with _autocast(state):
        e_policy = adapter.training_error(state.policy, x, nn_, tt, cond)
    if sft_only:
        return e_policy, None, None, None
    with torch.no_grad(), state.reference_context(), _autocast(state):
        ref_model = state.reference if state.reference is not None else state.policy
        e_ref = adapter.training_error(ref_model, x, nn_, tt, cond)
    if layout.pair_size == 2:
        e_policy = layout.gather_pair(e_policy)
        e_ref = layout.gather_pair(e_ref.detach())
    return e_policy[:b], e_policy[b:], e_ref[:b], e_ref[b:]


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
