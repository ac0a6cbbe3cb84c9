"""Supervised fine-tuning of stage 2 (and the demo's base model and baselines).

Completion-only loss: only the answer tokens (and the closing eos) are trained. Rows are
padded per batch, or packed into rows of `max_length` tokens. General data enter by a
fixed share of every batch (`general_mode: mix`). The loss is the token mean over all
ranks' answer tokens, so N ranks take the same step as one process.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.checkpoint import Checkpointer
from common.metrics import MetricsLogger
from llmpost.config import SftConfig
from llmpost.dapo_trainer import StageInterrupted
from llmpost.data import TaskRecord, encode_prompt, encode_response, mix
from llmpost.policy import global_sum, rank_and_world

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
    """Concatenate examples into rows of `max_length`; position ids restart per example.

    Attention is not blocked between examples of a row (as in TRL's classic packing);
    the labels never cross a boundary.
    """
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
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (i, lab, p) in enumerate(rows):
        ids[b, : len(i)], labels[b, : len(lab)] = torch.tensor(i), torch.tensor(lab)
        pos[b, : len(p)], attn[b, : len(i)] = torch.tensor(p), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn, "position_ids": pos}


def completion_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    num_tokens: float | None = None) -> torch.Tensor:
    """Sum of answer-token cross-entropies / `num_tokens` (default: this batch's count)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    denom = num_tokens if num_tokens is not None else (labels != IGNORE).sum().item()
    return total / max(float(denom), 1.0)


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
    stop_after: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """SFT for `cfg.steps` steps on target data (tasks drawn by `task_weights`) with
    `general_fraction` of each batch from `general`; resumes from `stage_dir/checkpoints`."""
    if cfg.general_mode != "mix":
        raise ValueError(
            f"sft.general_mode={cfg.general_mode!r}: only 'mix' is available "
            "(the projector mode needs common.regularizer)"
        )
    stage_dir = Path(stage_dir)
    rank, world = rank_and_world()
    # Sampling RNG from the stage's seed (a resumed run gets it back from the checkpoint).
    torch.manual_seed(seed + 7919 * rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpointer = Checkpointer(stage_dir / "checkpoints")
    start = checkpointer.load(model=model, optimizer=optimizer) or 0
    metrics_log = MetricsLogger(stage_dir, enabled=rank == 0)
    per_rank = max(1, cfg.batch_size // world)
    collate = collate_packed if cfg.packing else collate_padded
    cache: dict[str, tuple[list[int], list[int]]] = {}
    last: dict[str, float] = {}
    model.train()
    for step in range(start, cfg.steps):
        rng = random.Random(f"{seed}/sft/{step}/{rank}")
        records = mix(target, general, per_rank, cfg.general_fraction, rng, task_weights)
        examples = []
        for r in records:
            if r.id not in cache:
                cache[r.id] = build_example(tokenizer, r, chat_kwargs)
            examples.append(cache[r.id])
        batch = collate(examples, tokenizer.pad_token_id, cfg.max_length)
        local_tokens = float((batch["labels"][:, 1:] != IGNORE).sum())
        denom = global_sum(local_tokens) / world
        optimizer.zero_grad(set_to_none=True)
        loss = completion_loss(model, batch, denom)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        last = {"loss": global_sum(loss.item()) / world,
                "general_share": sum(r.category == "general" for r in records) / len(records)}
        metrics_log.log(step + 1, last)
        if on_step is not None:
            on_step(step + 1, last)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            checkpointer.save(step + 1, model=model, optimizer=optimizer)
        if stop_after is not None and step + 1 == stop_after:
            metrics_log.close()
            raise StageInterrupted(f"stopped after step {step + 1} (test hook)")
    metrics_log.close()
    return last
