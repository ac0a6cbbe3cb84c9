"""DAPO with general data as a regularizer (`dapo.general_mode: projector`).

The target is DAPO's clipped token loss on the stage's SNS groups, token-level as in
`llmpost.dapo.policy_loss`. `common.regularizer` wants one loss per sample whose mean is
the batch loss, so sequence i gets

    L_i = (B / N) * sum_t loss_{i,t}        (N: response tokens of the whole mini-batch)

and mean_i L_i = sum_{i,t} loss_{i,t} / N, DAPO's token mean. The general batch gives
the per-sample NLL of general *references* (prompt + reference answer, answer tokens
only, `llmpost.sft.per_sample_completion_loss`). References rather than the policy's own
correct general responses because: they exist for every general prompt whatever the
policy can do (a weak policy has few or no correct responses, so its own answers would
give an empty or biased general batch, and worst exactly when general ability is
slipping); they need no extra rollouts; and they are the same signal the SFT stage's
projector uses, so one feasible set means the same thing in stages 1-3.

Under FSDP2 the regularizer needs every rank to see the same batches: each rank samples
its share of the groups as in mix mode, then the mini-batches are gathered over ranks
(`gather_policy_batch`) and every rank runs the projector step on the whole batch. The
general batch is drawn from a generator seeded by (seed, step, mini-batch) only, so all
ranks draw the same one. The per-task metrics still pool over ranks: each rank reports
the clip fraction and entropy of its own sequences.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.errors import ConfigError
from common.regularizer import DataRegularizer, RegularizerStats
from llmpost.config import DapoConfig
from llmpost.dapo import clipped_tokens, kl_k3, mini_batch_indices, policy_token_losses, tis_weights
from llmpost.data import TaskRecord, sample_weighted
from llmpost.rollout import pack_right_padded, scatter_to_responses
from llmpost.sft import build_example, collate_padded, per_sample_completion_loss

NO_TRUNCATION = 1 << 30


class DapoSampleLoss:
    """`loss_fn(model, batch) -> (B,)` of the regularizer: per-sequence DAPO losses, or
    per-sample reference NLL for a general batch (one with `labels`).

    `batch` (a dict of tensors, built by `target_batch`) holds input_ids, attention_mask,
    response_mask, old_logp (and optionally ref_logp, engine_logp), advantages and
    token_scale = B / N per row. Full logits on purpose: the ghost path hooks the LM head
    and needs its per-sample input and output gradient. The last call on a whole batch
    (not a per-sample transform) leaves its detached log-probs and entropies in
    `self.last` for the metrics.
    """

    def __init__(self, cfg: DapoConfig) -> None:
        self.cfg = cfg
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" in batch:  # the general batch: NLL of the references
            return per_sample_completion_loss(model, batch)
        cfg = self.cfg
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
        logits = logits[:, :-1].float() / cfg.generation.temperature
        logprobs = F.log_softmax(logits, dim=-1)
        logp = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = batch["response_mask"].to(device).to(logp.dtype)
        old = batch["old_logp"].to(device)
        adv = batch["advantages"].to(device)
        per_token = policy_token_losses(logp, old, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
        if "engine_logp" in batch:
            per_token = per_token * tis_weights(old, batch["engine_logp"].to(device), cfg.tis_cap)
        if "ref_logp" in batch and cfg.kl_coef:
            per_token = per_token + cfg.kl_coef * kl_k3(logp, batch["ref_logp"].to(device))
        losses = (per_token * mask).sum(1) * batch["token_scale"].to(device)
        if not torch._C._functorch.is_functorch_wrapped_tensor(logits):
            with torch.no_grad():
                entropy = -(logprobs.exp() * logprobs).sum(-1)
            self.last = {"logp": logp.detach(), "entropy": entropy, "mask": mask.detach()}
        return losses


def gather_policy_batch(batch: Any) -> tuple[Any, slice]:
    """The whole mini-batch on every rank (rank order) and the slice that is this rank's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch, slice(0, len(batch))
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, batch)
    rank = dist.get_rank()
    start = sum(len(p) for p in parts[:rank])
    whole = type(batch)(
        [x for p in parts for x in p.prompts], [x for p in parts for x in p.responses],
        [x for p in parts for x in p.old_logprobs], torch.cat([p.advantages for p in parts]),
        [x for p in parts for x in p.tasks],
        None if batch.ref_logprobs is None else [x for p in parts for x in p.ref_logprobs],
        None if batch.engine_logprobs is None else [x for p in parts for x in p.engine_logprobs],
    )
    return whole, slice(start, start + len(batch))


def target_batch(batch: Any, pad_id: int) -> dict[str, torch.Tensor]:
    """A `PolicyBatch` as the tensors `DapoSampleLoss` reads (token values scattered to
    the response positions of the right-padded layout)."""
    ids, attn, mask = pack_right_padded(batch.prompts, batch.responses, pad_id)
    tokens = float(sum(len(r) for r in batch.responses))
    out = {"input_ids": ids, "attention_mask": attn, "response_mask": mask.float(),
           "old_logp": scatter_to_responses(batch.old_logprobs, mask),
           "advantages": batch.advantages.float(),
           "token_scale": torch.full((len(batch),), len(batch) / max(tokens, 1.0))}
    if batch.ref_logprobs is not None:
        out["ref_logp"] = scatter_to_responses(batch.ref_logprobs, mask)
    if batch.engine_logprobs is not None:
        out["engine_logp"] = scatter_to_responses(batch.engine_logprobs, mask)
    return out


def general_batch(tokenizer: Any, general: list[TaskRecord], n: int, rng: random.Random,
                  chat_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """n general prompts with their reference answers (labels on the answer only)."""
    rows = sample_weighted(general, n, rng)
    examples = [build_example(tokenizer, r, chat_kwargs) for r in rows]
    return collate_padded(examples, tokenizer.pad_token_id, NO_TRUNCATION)


def projector_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, regularizer: DataRegularizer,
    batch: Any, cfg: DapoConfig, pad_id: int, draw_general: Any,
) -> dict[str, Any]:
    """`epochs` x `mini_batches` projector steps on `batch` (this rank's share), in the
    shape `dapo_trainer.dapo_update` returns. `draw_general(update_index)` gives the
    general batch of each optimizer step (the same on every rank).

    `micro_batch_size` does not apply: the regularizer runs each mini-batch whole.
    """
    loss_fn = DapoSampleLoss(cfg)
    clip_frac = torch.zeros(len(batch))
    entropy = torch.zeros(len(batch))
    losses: list[float] = []
    stats: list[RegularizerStats] = []
    index = 0
    for _ in range(cfg.epochs):
        for mb_index in mini_batch_indices(len(batch), cfg.mini_batches):
            mine = batch.select(mb_index)
            whole, own = gather_policy_batch(mine)
            if len(whole) == 0:  # an empty mini-batch on every rank: nothing to project
                continue
            optimizer.zero_grad(set_to_none=True)
            step = regularizer.step(loss_fn, target_batch(whole, pad_id), draw_general(index))
            index += 1
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(step.target_loss)
            stats.append(step)
            if loss_fn.last and len(mine):
                last = {k: v[own].cpu() for k, v in loss_fn.last.items()}
                old = scatter_to_responses(mine.old_logprobs, last["mask"].bool())
                clipped = clipped_tokens(last["logp"], old, mine.advantages.float(),
                                         cfg.eps_low, cfg.eps_high).float()
                lengths = last["mask"].sum(1).clamp(min=1)
                clip_frac[mb_index] = (clipped * last["mask"]).sum(1) / lengths
                entropy[mb_index] = (last["entropy"] * last["mask"]).sum(1) / lengths
    out: dict[str, Any] = {"loss": sum(losses) / max(1, len(losses)), "clip_frac": clip_frac,
                           "entropy": entropy}
    if stats:
        for key in ("general_loss", "cos_update_target", "aligned_general", "update_norm"):
            out[f"projector/{key}"] = sum(getattr(s, key) for s in stats) / len(stats)
    return out


def build_dapo_regularizer(model: torch.nn.Module, cfg: DapoConfig, general: list[TaskRecord],
                           start_step: int = 0) -> DataRegularizer | None:
    """The stage's regularizer in projector mode (None in mix mode); a resumed stage
    continues the regularizer's step count (its sketch seeds)."""
    if cfg.general_mode == "mix":
        return None
    if not general:
        raise ConfigError("dapo.general_mode 'projector' needs general data (data.general_train)")
    regularizer = DataRegularizer(model, cfg.projector)
    regularizer.steps = start_step * cfg.epochs * cfg.mini_batches
    return regularizer
