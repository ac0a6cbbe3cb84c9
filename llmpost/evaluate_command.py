"""`llmpost eval --config CFG [--model DIR]`: score a model (by default the last finished
stage's) on the evaluation set, print per-task scores, write them and the capability map."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.config import add_config_args, config_from_args
from common.distributed import rank_and_world
from common.errors import ConfigError
from llmpost.config import PipelineConfig
from llmpost.diagnose import capability_map, write_capability_map
from llmpost.evaluate import format_scores
from llmpost.pipeline import evaluate_model, latest_model_dir, load_eval_set, rewards_registry
from llmpost.tokenizer import load_tokenizer

HELP = "per-task scores, SNS and general averages, and the capability map of a model"


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
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        cap = capability_map(result, cfg.diagnose)
        write_capability_map(cap, out.parent)
        print(f"model: {model_dir}")
        print(format_scores(result))
        print(f"weak SNS tasks (threshold {cfg.diagnose.threshold}): {', '.join(cap['weak']) or 'none'}")
        print(f"scores written to {out}; capability map to {out.parent / 'capability_map.json'}")
    return 0
