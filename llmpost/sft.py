"""Supervised fine-tuning of stage 2 (and the demo's base model and baselines).

Completion-only loss: only the answer tokens (and the closing eos) are trained. Rows are
padded per batch, or packed into rows of `max_length` tokens. General data enter by a
fixed share of every batch (`general_mode: mix`), or as the regularizer of
`common.regularizer` (`general_mode: projector`): the target gradient is projected onto
the feasible set spanned by a general batch's per-sample gradients. In mix mode the loss
is the token mean over all ranks' answer tokens, so N ranks take the same step as one
process; in projector mode every rank sees the same batches (the regularizer's contract).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.config import check_config
from common.distributed import global_sum, rank_and_world
from common.regularizer import DataRegularizer
from common.run import RunResult
from llmpost.config import SftConfig
from llmpost.data import TaskRecord, encode_prompt, encode_response, mix, sample_weighted
from llmpost.logprobs import DEFAULT_CHUNK_SIZE, response_logprobs
from llmpost.policy import start_stage

logger = logging.getLogger(__name__)

IGNORE = -100


def build_example(tokenizer: Any, record: TaskRecord, chat_kwargs: dict | None = None
                  ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt's labels set to -100."""
    prompt = encode_prompt(tokenizer, record, chat_kwargs)
    answer = encode_response(tokenizer, record.reference)
    return prompt + answer, [IGNORE] * len(prompt) + answer


def collate_padded(examples: list[tuple[list[int], list[int]]], pad_id: int, max_length: int
                   ) -> dict[str, torch.Tensor]:
    examples = [(i[:max_length], lab[:max_length]) for i, lab in examples]
    width = max(len(i) for i, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros(len(examples), width, dtype=torch.long)
    for b, (i, lab) in enumerate(examples):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        attn[b, : len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def collate_packed(examples: list[tuple[list[int], list[int]]], pad_id: int, max_length: int
                   ) -> dict[str, torch.Tensor]:
    """Concatenate examples into rows of `max_length`, position ids restarting per example
    and no attention mask, as `transformers.DataCollatorWithFlattening` packs: the model
    then attends within each example only (transformers reads the examples' bounds off
    the position ids). The labels never cross a boundary; the padding after the last
    example of a row is its own run of positions and is not scored."""
    rows: list[tuple[list[int], list[int], list[int]]] = [([], [], [])]
    for i, lab in examples:
        i, lab = i[:max_length], lab[:max_length]
        if len(rows[-1][0]) + len(i) > max_length:
            rows.append(([], [], []))
        rows[-1][0].extend(i)
        rows[-1][1].extend(lab)
        rows[-1][2].extend(range(len(i)))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (i, lab, p) in enumerate(rows):
        ids[b, : len(i)], labels[b, : len(lab)] = torch.tensor(i), torch.tensor(lab)
        pos[b, : len(p)] = torch.tensor(p)
        pos[b, len(p):] = torch.arange(width - len(p))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def completion_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    num_tokens: float | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Sum of answer-token cross-entropies / `num_tokens` (default: this batch's count).

    The LM head runs on the label positions only, `chunk_size` of them at a time
    (`llmpost.logprobs`), so no `(B, S, V)` logits are formed. Not the model's own loss
    (`labels`, `num_items_in_batch`): it forms them, 2.4 GB for one 1,024-token row at
    Qwen's 151,936 words (`tests/llmpost/test_logprobs.py` measures both).
    """
    device = next(model.parameters()).device
    labels = batch["labels"][:, 1:].to(device)
    scored = labels != IGNORE
    position_ids = batch.get("position_ids")
    logp, _ = response_logprobs(
        model, batch["input_ids"].to(device), _to(batch.get("attention_mask"), device), scored,
        chunk_size=chunk_size, targets=labels.clamp(min=0),
        position_ids=position_ids.to(device) if position_ids is not None else None)
    denom = num_tokens if num_tokens is not None else scored.sum().item()
    return -logp.sum() / max(float(denom), 1.0)


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def per_sample_completion_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                               ) -> torch.Tensor:
    """`(B,)`: each row's mean cross-entropy over its answer tokens (the regularizer's loss).

    Full logits on purpose: the regularizer's ghost path hooks the LM head and needs its
    per-sample `(B, S, D)` input and `(B, S, V)` output gradient.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    counts = (labels != IGNORE).sum(1).clamp(min=1)
    return token.sum(1) / counts


def train_sft(
    model: torch.nn.Module,
    tokenizer: Any,
    target: list[TaskRecord],
    general: list[TaskRecord],
    cfg: SftConfig,
    stage_dir: str | Path,
    seed: int = 0,
    task_weights: dict[str, float] | None = None,
    chat_kwargs: dict | None = None,
    validator: Callable[[], dict[str, float]] | None = None,
    validate_every: int = 0,
) -> RunResult:
    """SFT for `cfg.steps` steps on target data (tasks drawn by `task_weights`) with
    `general_fraction` of each batch from `general`; resumes from `stage_dir/checkpoints`.
    `validator()` runs every `validate_every` steps; its metrics join the step's under `val/`."""
    check_config(cfg)
    if cfg.general_mode == "projector" and not general:
        raise ValueError("sft.general_mode 'projector' needs general data (data.general_train)")
    stage_dir = Path(stage_dir)
    rank, _ = rank_and_world()
    run = start_stage(model, cfg.lr, cfg.weight_decay, stage_dir, seed, cfg.steps, cfg.save_every,
                      f"SFT {stage_dir.name}", validate_every)
    optimizer = run.optimizer
    cache: dict[str, tuple[list[int], list[int]]] = {}
    model.train()
    regularizer = DataRegularizer(model, cfg.projector) if cfg.general_mode == "projector" else None

    def examples_of(records: list[TaskRecord]) -> list[tuple[list[int], list[int]]]:
        for r in records:
            if r.id not in cache:
                cache[r.id] = build_example(tokenizer, r, chat_kwargs)
        return [cache[r.id] for r in records]

    try:
        while run.step < cfg.steps:
            step = run.step
            if regularizer is not None:
                metrics = _projector_step(model, optimizer, regularizer, examples_of, target, general,
                                       cfg, tokenizer.pad_token_id, random.Random(f"{seed}/sft/{step}"),
                                       task_weights)
            else:
                metrics = _mix_step(model, optimizer, examples_of, target, general, cfg,
                                 tokenizer.pad_token_id, random.Random(f"{seed}/sft/{step}/{rank}"),
                                 task_weights)
            run.bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            run.end_step(metrics, validator)
    finally:
        run.finish()
    return run.result()


def _mix_step(model, optimizer, examples_of, target, general, cfg: SftConfig, pad_id: int,
              rng: random.Random, task_weights) -> dict[str, float]:
    """One step on a batch with `general_fraction` general rows; token mean over all ranks."""
    _, world = rank_and_world()
    per_rank = max(1, cfg.batch_size // world)
    collate = collate_packed if cfg.packing else collate_padded
    records = mix(target, general, per_rank, cfg.general_fraction, rng, task_weights)
    batch = collate(examples_of(records), pad_id, cfg.max_length)
    local_tokens = float((batch["labels"][:, 1:] != IGNORE).sum())
    denom = global_sum(local_tokens) / world
    optimizer.zero_grad(set_to_none=True)
    loss = completion_loss(model, batch, denom, cfg.logprob_chunk_size)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return {"loss": global_sum(loss.item()) / world,
            "general_share": sum(r.category == "general" for r in records) / len(records)}


def _projector_step(model, optimizer, regularizer: DataRegularizer, examples_of, target, general,
                    cfg: SftConfig, pad_id: int, rng: random.Random, task_weights
                    ) -> dict[str, float]:
    """One step: the target batch's gradient projected onto the general batch's feasible set."""
    target_rows = sample_weighted(target, cfg.batch_size, rng, task_weights)
    general_rows = sample_weighted(general, cfg.projector.n_general, rng)
    target_batch = collate_padded(examples_of(target_rows), pad_id, cfg.max_length)
    general_batch = collate_padded(examples_of(general_rows), pad_id, cfg.max_length)
    optimizer.zero_grad(set_to_none=True)
    stats = regularizer.step(per_sample_completion_loss, target_batch, general_batch)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    out = {"loss": float(stats.target_loss), "general_share": 0.0}
    out.update({f"projector/{k}": float(v) for k, v in vars(stats).items()
                if isinstance(v, (int, float))})
    return out
