"""Per-task evaluation: greedy answers scored by each task's reward; SNS and general
averages. Also the `llmpost eval --config CFG [--model DIR]` command."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import add_config_args, config_from_args
from common.errors import ConfigError
from llmpost.config import EvalConfig, PipelineConfig
from llmpost.data import TaskRecord, by_task, encode_prompt
from llmpost.policy import rank_and_world
from llmpost.rewards import RewardRegistry
from llmpost.rollout import GenerationConfig, HFRollout

HELP = "per-task scores, SNS and general averages, and the capability map of a model"


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
    mine = records[rank::world]
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: Path, how: str) -> None:
    """A model directory `eval` can use: config.json and a tokenizer; ConfigError otherwise."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"{how}: no model at {path} (expected {path / 'config.json'})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{how}: {path} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, example="eval.per_task=16")
    parser.add_argument("--model", help="model directory (default: the last finished stage)")
    parser.add_argument("--out", help="JSON file for the scores (default: RUN_DIR/eval.json)")


def run(args: argparse.Namespace) -> int:
    from llmpost.pipeline import evaluate_model, latest_model_dir, load_eval_set, rewards_registry
    from llmpost.tokenizer import load_tokenizer

    cfg = config_from_args(PipelineConfig, args)
    registry = rewards_registry(cfg)
    records = load_eval_set(cfg, registry)  # bad rows stop here, before any model is read
    if args.model:
        model_dir = Path(args.model)
        check_model_dir(model_dir, "--model")
    else:
        model_dir = latest_model_dir(cfg)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{cfg.run_dir}: no model to evaluate yet (no finished stage, no base model "
                              f"at {model_dir}); run `llmpost run --config CFG` first, or pass --model DIR")
        check_model_dir(model_dir, cfg.run_dir)
    tokenizer = load_tokenizer(model_dir)
    result = evaluate_model(cfg, model_dir, tokenizer, records, registry)
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "eval.json"
    if rank_and_world()[0] == 0:
        from llmpost.diagnose import capability_map, write_capability_map

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        cap = capability_map(result, cfg.diagnose)
        write_capability_map(cap, out.parent)
        print(f"model: {model_dir}")
        print(format_scores(result))
        print(f"weak SNS tasks (threshold {cfg.diagnose.threshold}): {', '.join(cap['weak']) or 'none'}")
        print(f"scores written to {out}; capability map to {out.parent / 'capability_map.json'}")
    return 0
