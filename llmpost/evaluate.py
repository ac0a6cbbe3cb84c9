"""Per-task evaluation: greedy answers scored by each task's reward; SNS and general
averages. The `llmpost eval` command is `llmpost.evaluate_command`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from common.distributed import rank_and_world, rank_share
from llmpost.config import EvalConfig, GenerationConfig
from llmpost.data import TaskRecord, by_task, encode_prompt
from llmpost.rewards import RewardRegistry
from llmpost.rollout import HFRollout


def eval_records(records: list[TaskRecord], per_task: int) -> list[TaskRecord]:
    """The first `per_task` rows of each task (all with 0), in task order."""
    out = []
    for _, rows in sorted(by_task(records).items()):
        out += rows[:per_task] if per_task else rows
    return out


def evaluate_tasks(
    model: torch.nn.Module, tokenizer: Any, records: list[TaskRecord],
    registry: RewardRegistry, cfg: EvalConfig, chat_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Greedy-decode every record (split over ranks) and average its reward per task."""
    return summarize(score_rows(model, tokenizer, records, registry, cfg, chat_kwargs))


@torch.no_grad()
def score_rows(
    model: torch.nn.Module, tokenizer: Any, records: list[TaskRecord],
    registry: RewardRegistry, cfg: EvalConfig, chat_kwargs: dict | None = None,
) -> list[dict[str, Any]]:
    """One row per record: greedy response and its reward; every rank gets all rows."""
    rank, world = rank_and_world()
    mine = rank_share(records, rank, world)
    # FSDP's collectives need every rank to generate the same number of rows.
    n_rows = -(-len(records) // world)
    padded = mine + records[: n_rows - len(mine)]
    rollout = HFRollout(model, tokenizer, GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size))
    prompts = [encode_prompt(tokenizer, r, chat_kwargs) for r in padded]
    out = rollout.generate(prompts, 1, greedy=True, with_logprobs=False) if prompts else None
    rows = []
    for r, text in zip(mine, out.texts if out else []):
        score = registry.score(r.reward, r.prompt_text(), text, r.reference, r.meta)
        rows.append({"id": r.id, "task": r.task, "category": r.category, "score": score,
                     "response": text, "reference": r.reference})
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task mean score, SNS average and general average (means over tasks)."""
    scores: dict[str, list[float]] = defaultdict(list)
    category: dict[str, str] = {}
    for row in rows:
        scores[row["task"]].append(row["score"])
        category[row["task"]] = row["category"]
    tasks = {t: sum(v) / len(v) for t, v in sorted(scores.items())}

    def average(cat: str) -> float | None:
        values = [s for t, s in tasks.items() if category[t] == cat]
        return sum(values) / len(values) if values else None

    return {"tasks": tasks, "categories": category, "sns_avg": average("sns"),
            "general_avg": average("general"),
            "examples": {t: [r for r in rows if r["task"] == t][:3] for t in tasks}}


def format_scores(result: dict[str, Any]) -> str:
    lines = [f"{task:14s} {result['categories'][task]:8s} {score:.3f}"
             for task, score in result["tasks"].items()]
    for name in ("sns_avg", "general_avg"):
        if result[name] is not None:
            lines.append(f"{name:14s} {'':8s} {result[name]:.3f}")
    return "\n".join(lines)
