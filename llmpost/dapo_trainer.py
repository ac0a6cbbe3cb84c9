"""The DAPO training loop of stages 1 and 3: sample groups, score, keep informative
groups, then several mini-batch updates against the old log-probs.

Each rank samples its share of the prompts; the policy is FSDP2-sharded and the loss of
a mini-batch is the token mean over the tokens of all ranks (`dapo_update`), so N ranks
take the same step as one process with the whole batch.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import check_config
from common.distributed import any_rank, global_max, global_sum, rank_and_world
from common.errors import ConfigError
from common.run import RunResult
from llmpost.config import DapoConfig
from llmpost.dapo import (
    SampledGroup,
    clipped_tokens,
    dynamic_sample,
    group_advantages,
    kl_k3,
    logprob_mismatch,
    mini_batch_indices,
    overlong_penalty,
    policy_loss,
    tis_weights,
)
from llmpost.dapo_regularized import build_dapo_regularizer, general_batch, projector_update
from llmpost.data import TaskRecord, encode_prompt, mix
from llmpost.logprobs import response_logprobs
from llmpost.policy import start_stage
from llmpost.rewards import RewardRegistry
from llmpost.rollout import (
    HFRollout,
    VLLMRollout,
    build_rollout,
    pack_right_padded,
    scatter_to_responses,
)

logger = logging.getLogger(__name__)


@dataclass
class PolicyBatch:
    """Sequences of one update, consecutive groups; old log-probs per response token."""

    prompts: list[list[int]]
    responses: list[list[int]]
    old_logprobs: list[list[float]]
    advantages: torch.Tensor  # (B,)
    tasks: list[str]
    ref_logprobs: list[list[float]] | None = None  # only with a KL term
    engine_logprobs: list[list[float]] | None = None  # only with dapo.tis_cap (vllm)

    def __len__(self) -> int:
        return len(self.responses)

    def select(self, index: list[int]) -> PolicyBatch:
        return PolicyBatch(
            [self.prompts[i] for i in index], [self.responses[i] for i in index],
            [self.old_logprobs[i] for i in index], self.advantages[index],
            [self.tasks[i] for i in index],
            None if self.ref_logprobs is None else [self.ref_logprobs[i] for i in index],
            None if self.engine_logprobs is None else [self.engine_logprobs[i] for i in index],
        )


def check_prompt_split(cfg: DapoConfig, world: int, key: str = "dapo") -> None:
    """Each rank samples `prompts_per_step / world` groups: refuse a count that does not
    split evenly (it would silently train on fewer, or more, prompts than asked)."""
    if cfg.prompts_per_step % world:
        raise ConfigError(f"{key}.prompts_per_step={cfg.prompts_per_step} does not split over {world} ranks; "
                          f"use a multiple of {world}")


def dapo_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: PolicyBatch,
    cfg: DapoConfig, pad_id: int,
) -> dict[str, Any]:
    """`epochs` x `mini_batches` optimizer steps on `batch` (this rank's share).

    Every rank runs the same number of forwards (an empty share runs one masked dummy
    row) because FSDP's collectives must match. Returns per-sequence clip fraction and
    entropy for the metrics.
    """
    _, world = rank_and_world()
    clip_frac = torch.zeros(len(batch))
    entropy = torch.zeros(len(batch))
    losses = []
    temperature = cfg.generation.temperature
    for _ in range(cfg.epochs):
        for mb_index in mini_batch_indices(len(batch), cfg.mini_batches):
            mb = batch.select(mb_index)
            local_tokens = float(sum(len(r) for r in mb.responses))
            # DP averages gradients over ranks: scale the denominator so the result is the
            # token mean over the whole (all-rank) mini-batch.
            denom = global_sum(local_tokens) / world
            optimizer.zero_grad(set_to_none=True)
            micro = cfg.micro_batch_size or max(1, len(mb))
            chunks = [mb_index[i : i + micro] for i in range(0, len(mb_index), micro)] or [[]]
            n_chunks = int(global_max(len(chunks)))
            chunks += [[]] * (n_chunks - len(chunks))
            mb_loss = 0.0
            for chunk in chunks:
                part = batch.select(chunk)
                if len(part) == 0:  # keep collectives in step: a masked dummy row
                    prompts, responses, old, adv = [[pad_id]], [[pad_id]], [[0.0]], torch.zeros(1)
                    ref, engine, weight = [[0.0]], [[0.0]], 0.0
                else:
                    prompts, responses = part.prompts, part.responses
                    old, adv, weight = part.old_logprobs, part.advantages, 1.0
                    ref, engine = part.ref_logprobs, part.engine_logprobs
                ids, attn, mask = pack_right_padded(prompts, responses, pad_id)
                device = next(model.parameters()).device
                logp, ent = response_logprobs(model, ids.to(device), attn.to(device), mask,
                                              temperature, cfg.logprob_chunk_size,
                                              with_entropy=True)
                old_t = scatter_to_responses(old, mask, logp)
                mask = mask.to(device) * weight
                token_weights = None
                if cfg.tis_cap is not None:
                    token_weights = tis_weights(old_t, scatter_to_responses(engine, mask, logp),
                                               cfg.tis_cap)
                loss = policy_loss(logp, old_t, adv.to(device), mask, cfg.eps_low, cfg.eps_high,
                                   cfg.dual_clip, num_tokens=max(denom, 1.0),
                                   token_weights=token_weights)
                if cfg.kl_coef:
                    ref_t = scatter_to_responses(ref, mask, logp)
                    kl = (kl_k3(logp, ref_t) * mask).sum() / max(denom, 1.0)
                    loss = loss + cfg.kl_coef * kl
                loss.backward()
                mb_loss += loss.item()
                if weight:
                    clipped = clipped_tokens(logp.detach(), old_t, adv.to(device),
                                             cfg.eps_low, cfg.eps_high).float()
                    lengths = mask.sum(1).clamp(min=1)
                    clip_frac[chunk] = ((clipped * mask).sum(1) / lengths).cpu()
                    entropy[chunk] = ((ent * mask).sum(1) / lengths).cpu()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(mb_loss)
    return {"loss": sum(losses) / max(1, len(losses)), "clip_frac": clip_frac, "entropy": entropy}


def score_responses(
    records: list[TaskRecord], texts: list[str], registry: RewardRegistry
) -> list[float]:
    # score_many: code rewards run side by side in the sandbox pool
    return registry.score_many([(r.reward, r.prompt_text(), t, r.reference, r.meta)
                                for r, t in zip(records, texts)])


def train_dapo(
    model: torch.nn.Module,
    tokenizer: Any,
    target: list[TaskRecord],
    general: list[TaskRecord],
    cfg: DapoConfig,
    registry: RewardRegistry,
    stage_dir: str | Path,
    seed: int = 0,
    chat_kwargs: dict | None = None,
    model_path: str | Path | None = None,
    reference: torch.nn.Module | None = None,
    engine: VLLMRollout | None = None,
    validator: Callable[[], dict[str, float]] | None = None,
    validate_every: int = 0,
) -> RunResult:
    """Run DAPO for `cfg.steps` steps, resuming from `stage_dir/checkpoints` if present;
    `validator()` runs every `validate_every` steps (its metrics join the step's under `val/`).

    With `generation.backend: vllm` responses come from a vLLM engine (`engine`, or one
    started from `model_path` and closed at the end) that gets the policy's weights before
    every rollout; the old log-probs are recomputed by the policy itself, and every step
    logs the gap to the engine's (`logprob_gap_mean`, `logprob_gap_max`, `logprob_kl_k3`
    over the sampled tokens); `dapo.tis_cap` weights the token losses by
    min(p_old / p_engine, C). With `hf` the old log-probs come from the logits `generate`
    computed (or a fresh forward with `generation.recompute_logprobs`).
    `cfg.kl_coef > 0` needs `reference` (a frozen copy of the starting model).
    """
    if cfg.kl_coef and reference is None:
        raise ValueError("dapo.kl_coef > 0 needs a reference model")
    use_engine = cfg.generation.backend == "vllm"
    if cfg.tis_cap is not None and not use_engine:
        raise ConfigError("dapo.tis_cap corrects the engine's sampling: it needs "
                          "generation.backend=vllm")
    if cfg.tis_cap is not None and cfg.tis_cap <= 0:
        raise ConfigError(f"dapo.tis_cap: expected a cap > 0 (e.g. 2), got {cfg.tis_cap}")
    stage_dir = Path(stage_dir)
    rank, world = rank_and_world()
    check_config(cfg)
    check_prompt_split(cfg, world)
    run = start_stage(model, cfg.lr, cfg.weight_decay, stage_dir, seed, cfg.steps, cfg.save_every,
                      f"DAPO {stage_dir.name}", validate_every)
    optimizer, start = run.optimizer, run.step
    regularizer = build_dapo_regularizer(model, cfg, general, start)
    scorer = HFRollout(model, tokenizer, cfg.generation)
    ref_scorer = HFRollout(reference, tokenizer, cfg.generation) if cfg.kl_coef else None
    own_engine = use_engine and engine is None
    rollout = engine if engine is not None else build_rollout(
        model, tokenizer, cfg.generation, str(model_path) if model_path else None)
    if not use_engine:
        rollout = scorer
    groups_per_rank = cfg.prompts_per_step // world
    prompt_cache: dict[str, list[int]] = {}
    if start:
        logger.info("DAPO: resuming at step %d of %d", start, cfg.steps)

    for step in range(start, cfg.steps):  # run.step == step: end_step counts it
        t0 = time.perf_counter()
        if rollout is not scorer:
            rollout.sync_weights(model)

        def sample_round(round_index: int, step: int = step) -> list[SampledGroup]:
            rng = random.Random(f"{seed}/dapo/{step}/{round_index}/{rank}")
            records = mix(target, general, groups_per_rank,
                          0.0 if regularizer is not None else cfg.general_fraction, rng)
            prompts = []
            for r in records:
                if r.id not in prompt_cache:
                    prompt_cache[r.id] = encode_prompt(tokenizer, r, chat_kwargs)
                prompts.append(prompt_cache[r.id])
            if use_engine:
                out = rollout.generate(prompts, cfg.group_size,
                                       seed=_sampling_seed(seed, step, round_index, rank))
                out.logprobs = scorer.score(out.prompt_ids, out.response_ids)
            else:
                out = rollout.generate(prompts, cfg.group_size)
            engine_logprobs = out.engine_logprobs or [None] * len(out.response_ids)
            ref_logprobs = (ref_scorer.score(out.prompt_ids, out.response_ids)
                            if ref_scorer is not None else [None] * len(out.response_ids))
            expanded = [r for r in records for _ in range(cfg.group_size)]
            correct = score_responses(expanded, out.texts, registry)
            shaped = torch.tensor(correct) + overlong_penalty(
                torch.tensor(out.lengths), cfg.generation.max_new_tokens,
                cfg.overlong_buffer, cfg.overlong_factor)
            groups = []
            for g, record in enumerate(records):
                sl = slice(g * cfg.group_size, (g + 1) * cfg.group_size)
                groups.append(SampledGroup(shaped[sl].tolist(), data={
                    "record": record, "prompt": out.prompt_ids[sl.start],
                    "responses": out.response_ids[sl], "logprobs": out.logprobs[sl],
                    "lengths": out.lengths[sl], "truncated": out.truncated[sl],
                    "correct": correct[sl], "ref_logprobs": ref_logprobs[sl],
                    "engine_logprobs": engine_logprobs[sl],
                }))
            return groups

        if cfg.dynamic_sampling:
            result = dynamic_sample(sample_round, groups_per_rank, cfg.max_extra_rounds,
                                    keep_going=any_rank)
            kept, seen = result.groups, result.groups + result.dropped
            sampling = {"sampling_rounds": result.rounds, "cap_hit": float(result.cap_hit)}
        else:
            kept = seen = list(sample_round(0))
            sampling = {"sampling_rounds": 1, "cap_hit": 0.0}
        generated_tokens = sum(sum(g.data["lengths"]) for g in seen)
        if use_engine:
            rollout.sleep()

        batch = PolicyBatch(
            prompts=[g.data["prompt"] for g in kept for _ in range(cfg.group_size)],
            responses=[r for g in kept for r in g.data["responses"]],
            old_logprobs=[lp for g in kept for lp in g.data["logprobs"]],
            advantages=(group_advantages(torch.tensor([x for g in kept for x in g.rewards]),
                                         cfg.group_size) if kept else torch.zeros(0)),
            tasks=[g.data["record"].task for g in kept for _ in range(cfg.group_size)],
            ref_logprobs=([lp for g in kept for lp in g.data["ref_logprobs"]]
                          if cfg.kl_coef else None),
            engine_logprobs=([lp for g in kept for lp in g.data["engine_logprobs"]]
                             if cfg.tis_cap is not None else None),
        )
        if any_rank(len(batch) > 0) and regularizer is not None:
            update = projector_update(
                model, optimizer, regularizer, batch, cfg, tokenizer.pad_token_id,
                lambda i, step=step: general_batch(
                    tokenizer, general, cfg.projector.n_general,
                    random.Random(f"{seed}/dapo-general/{step}/{i}"), chat_kwargs))
        elif any_rank(len(batch) > 0):
            update = dapo_update(model, optimizer, batch, cfg, tokenizer.pad_token_id)
        else:
            logger.warning("DAPO step %d: no informative group on any rank; update skipped", step)
            update = {"loss": 0.0, "clip_frac": torch.zeros(0), "entropy": torch.zeros(0)}

        metrics = _step_metrics(seen, kept, batch, update, cfg.group_size)
        metrics.update(sampling)
        metrics.update({k: v for k, v in update.items() if k.startswith("projector/")})
        if use_engine:
            metrics.update(_mismatch_metrics(seen))
        metrics.update(step_time_s=time.perf_counter() - t0,
                       tokens_per_s=generated_tokens / max(1e-9, time.perf_counter() - t0))
        run.bar.set_postfix(acc=f"{metrics.get('accuracy', 0):.2f}", kept=f"{metrics.get('kept_share', 0):.2f}")
        run.end_step(metrics, validator)
    if own_engine:  # (an interrupted stage leaves its engine to the process's end)
        rollout.close()
    run.finish()
    return run.result()


def _sampling_seed(seed: int, step: int, round_index: int, rank: int) -> int:
    """The engine's sampling seed of one rollout round: a resumed run draws the same."""
    return (seed * 1_000_003 + step * 1009 + round_index * 97 + rank) % 2**31


def _mismatch_metrics(seen: list[SampledGroup]) -> dict[str, float]:
    """`logprob_mismatch` between the engine's and the policy's log-probs over every
    sampled token of this step, pooled over ranks."""
    engine = [x for g in seen for lp in g.data["engine_logprobs"] for x in lp]
    policy = [x for g in seen for lp in g.data["logprobs"] for x in lp]
    gap = logprob_mismatch(torch.tensor(engine, dtype=torch.float64),
                           torch.tensor(policy, dtype=torch.float64))
    tokens = global_sum(gap["tokens"])
    return {
        "logprob_gap_mean": global_sum(gap["mean_abs"] * gap["tokens"]) / max(tokens, 1.0),
        "logprob_gap_max": global_max(gap["max_abs"]),
        "logprob_kl_k3": global_sum(gap["kl_k3"] * gap["tokens"]) / max(tokens, 1.0),
    }


def _step_metrics(seen: list[SampledGroup], kept: list[SampledGroup], batch: PolicyBatch,
                  update: dict[str, Any], group_size: int) -> dict[str, float]:
    """Reward, accuracy, length, truncation and kept share per task; clip fraction and
    entropy per task over the trained sequences; and their overall means."""
    per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    kept_ids = {id(g) for g in kept}
    for g in seen:
        task = g.data["record"].task
        per_task[task]["reward"] += g.rewards
        per_task[task]["accuracy"] += [float(c >= 1.0) for c in g.data["correct"]]
        per_task[task]["response_length"] += [float(x) for x in g.data["lengths"]]
        per_task[task]["truncated"] += [float(x) for x in g.data["truncated"]]
        per_task[task]["kept_share"].append(float(id(g) in kept_ids))
    for i, task in enumerate(batch.tasks):
        if i < len(update["clip_frac"]):
            per_task[task]["clip_frac"].append(float(update["clip_frac"][i]))
            per_task[task]["entropy"].append(float(update["entropy"][i]))
    sums = {f"{task}/{name}": (sum(xs), len(xs)) for task, values in per_task.items()
            for name, xs in values.items() if xs}
    sums["loss"] = (float(update["loss"]), 1)
    sums = _pool_over_ranks(sums)
    loss_total, loss_count = sums.pop("loss")
    out: dict[str, float] = {"loss": loss_total / loss_count}  # mean over ranks
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for key, (total, count) in sorted(sums.items()):
        out[key] = total / count
        name = key.rsplit("/", 1)[1]
        totals[name][0] += total
        totals[name][1] += count
    for name, (total, count) in totals.items():
        out[name] = total / count
    return out


def _pool_over_ranks(sums: dict[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
    """(sum, count) per metric added up over all ranks (each rank saw its own groups)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sums
    gathered: list[dict[str, tuple[float, int]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, sums)
    pooled: dict[str, tuple[float, int]] = {}
    for rank_sums in gathered:
        for key, (total, count) in rank_sums.items():
            old_total, old_count = pooled.get(key, (0.0, 0))
            pooled[key] = (old_total + total, old_count + count)
    return pooled
