"""`llmpost run --config CFG [--stage N]`: the RedOne 2.0 pipeline, one stage at a time.

    base -> stage 1 exploratory DAPO on the SNS + general pool -> diagnose (capability map)
         -> stage 2 targeted SFT (every SNS task, weak ones up-weighted, general share)
         -> stage 3 refinement DAPO on hard examples

Layout under `run_dir`: `base/`, `stage1/`, `stage2/`, `stage3/`, each with `model/`
(save_pretrained), `checkpoints/`, `metrics.jsonl`, `eval.json` and `done.json`;
`stage1/capability_map.{json,png}`. A stage with `done.json` is skipped; an unfinished
one resumes from its last checkpoint, after checking that the settings it was started
with (model, data, seed, the stage's own section) did not change (`--resume-force`
continues anyway). Every task row's reward is checked before a stage trains.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import Checkpointer
from common.config import (
    CONFIG_FILENAME,
    add_config_args,
    config_from_args,
    resume_mismatch,
    save_config,
)
from common.distributed import barrier, global_sum, init_distributed, rank_and_world
from common.errors import ConfigError, DataError
from common.io import write_text_atomic
from llmpost.config import PipelineConfig
from llmpost.dapo_trainer import check_prompt_split, train_dapo
from llmpost.data import TaskRecord, load_many
from llmpost.diagnose import capability_map, write_capability_map
from llmpost.evaluate import eval_records, evaluate_tasks, format_scores, score_rows
from llmpost.policy import (
    build_policy,
    save_policy,
    shard_policy,
    untie_embeddings,
)
from llmpost.rewards import RewardRegistry, default_registry
from llmpost.sandbox import CodeSandbox
from llmpost.sft import train_sft
from llmpost.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

HELP = "run the three-stage pipeline (or one stage with --stage N); resumes where it stopped"


def stage_dir(cfg: PipelineConfig, stage: int) -> Path:
    return Path(cfg.run_dir) / ("base" if stage == 0 else f"stage{stage}")


def is_done(cfg: PipelineConfig, stage: int) -> bool:
    return (stage_dir(cfg, stage) / "done.json").exists()


def model_dir(cfg: PipelineConfig, stage: int) -> Path:
    """Where stage `stage`'s model lives; stage 0 is the base (`model.path`, or the tiny
    model the pipeline builds once under `base/model`)."""
    if stage == 0 and cfg.model.path:
        return Path(cfg.model.path)
    return stage_dir(cfg, stage) / "model"


def latest_model_dir(cfg: PipelineConfig) -> Path:
    for stage in (3, 2, 1):
        if is_done(cfg, stage):
            return model_dir(cfg, stage)
    return model_dir(cfg, 0)


def rewards_registry(cfg: PipelineConfig) -> RewardRegistry:
    """The built-in rewards, the code reward's sandbox set up as `cfg.rewards` says."""
    sandbox = CodeSandbox(allow_unsandboxed=cfg.rewards.allow_unsandboxed_code,
                          workers=cfg.rewards.code_workers)
    return default_registry(code_sandbox=sandbox)


def load_eval_set(cfg: PipelineConfig, registry: RewardRegistry) -> list[TaskRecord]:
    """The eval rows (first `eval.per_task` of each task), their rewards checked; an empty
    set is an error."""
    files = cfg.data.sns_eval + cfg.data.general_eval
    records = eval_records(load_many(files), cfg.eval.per_task)
    if not records:
        raise DataError(f"data.sns_eval / data.general_eval: no eval rows in {files or 'no files'}; "
                        "at least one JSONL task file with rows is expected")
    registry.check_records(records)
    return records


def _load_data(cfg: PipelineConfig, registry: RewardRegistry) -> dict[str, list[TaskRecord]]:
    data = cfg.data
    if not data.sns_train:
        raise ConfigError("data.sns_train: at least one JSONL task file is expected")
    out = {"sns_train": load_many(data.sns_train), "general_train": load_many(data.general_train)}
    if not out["sns_train"]:
        raise DataError(f"data.sns_train: no rows in {data.sns_train}")
    registry.check_records(out["sns_train"] + out["general_train"])
    out["eval"] = load_eval_set(cfg, registry)
    return out


def started_stages(cfg: PipelineConfig) -> list[int]:
    """Stages with a checkpoint but no done.json: the ones a run would resume."""
    return [s for s in (1, 2, 3)
            if not is_done(cfg, s) and Checkpointer(stage_dir(cfg, s) / "checkpoints").latest()]


def check_resume(cfg: PipelineConfig, force: bool = False) -> None:
    """Stop when a stage would resume under settings other than those it started with
    (the run's saved config.yaml): model, data, seed and that stage's section."""
    stages = started_stages(cfg)
    if not stages:
        return
    keys = ["model", "data", "seed"] + [f"stage{s}" for s in stages]
    saved = Path(cfg.run_dir) / CONFIG_FILENAME
    diff = resume_mismatch(cfg, saved, keys)
    if not diff:
        return
    message = (f"{saved}: stage {stages[0]} would resume with a different config "
               f"({'; '.join(diff)})")
    if force:
        logger.warning("--resume-force: %s", message)
        return
    raise ConfigError(f"{message}; use the saved config, or --resume-force to continue anyway")


def prepare_base(cfg: PipelineConfig) -> Path:
    """The base model directory; builds and saves the tiny model when no path is given."""
    out = model_dir(cfg, 0)
    # Every rank must take the same branch (saving is collective): exists on all ranks?
    if global_sum(float((out / "config.json").exists())) == rank_and_world()[1]:
        return out
    if cfg.model.path:
        raise FileNotFoundError(f"model.path {out} has no config.json")
    if not cfg.model.tokenizer:
        raise ConfigError("model.tokenizer: a tokenizer directory is needed to build the tiny model")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = build_policy(cfg.model, tokenizer, None, seed=cfg.seed)
    return save_policy(model, tokenizer, out)


def evaluate_model(cfg: PipelineConfig, path: Path, tokenizer: Any, records: list[TaskRecord],
                   registry: RewardRegistry) -> dict[str, Any]:
    model = shard_policy(build_policy(cfg.model, tokenizer, path), cfg.model)
    return evaluate_tasks(model, tokenizer, records, registry, cfg.eval, cfg.data.chat_kwargs)


def _write_json(path: Path, payload: Any) -> None:
    if rank_and_world()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(payload, indent=2))


def hard_examples(model: torch.nn.Module, tokenizer: Any, cfg: PipelineConfig,
                  pool: list[TaskRecord], registry: RewardRegistry) -> list[TaskRecord]:
    """Records of a probe (first `hard_probe_per_task` per task) the model gets wrong greedily;
    the whole pool when it solves them all."""
    probe = eval_records(pool, cfg.stage3.hard_probe_per_task)
    rows = score_rows(model, tokenizer, probe, registry, cfg.eval, cfg.data.chat_kwargs)
    wrong = {r["id"] for r in rows if r["score"] < 1.0}
    hard = [r for r in probe if r.id in wrong]
    logger.info("stage 3: %d hard examples of %d probed", len(hard), len(probe))
    return hard or pool


@dataclass(frozen=True)
class StageInputs:
    """What a stage's train function gets: the policy to train in place and its data."""

    cfg: PipelineConfig
    model: torch.nn.Module
    tokenizer: Any
    data: dict[str, list[TaskRecord]]
    registry: RewardRegistry
    out: Path
    seed: int
    previous: Path  # the model the stage starts from
    reference: torch.nn.Module | None


def _exploratory_dapo(x: StageInputs) -> None:
    train_dapo(x.model, x.tokenizer, x.data["sns_train"], x.data["general_train"], x.cfg.stage1, x.registry,
               x.out, x.seed, x.cfg.data.chat_kwargs, model_path=x.previous, reference=x.reference)


def _targeted_sft(x: StageInputs) -> None:
    cap = json.loads((stage_dir(x.cfg, 1) / "capability_map.json").read_text())
    train_sft(x.model, x.tokenizer, x.data["sns_train"], x.data["general_train"], x.cfg.stage2, x.out,
              x.seed, task_weights=cap["weights"], chat_kwargs=x.cfg.data.chat_kwargs)


def _refinement_dapo(x: StageInputs) -> None:
    pool = x.data["sns_train"]
    if x.cfg.stage3.hard_examples:
        pool = hard_examples(x.model, x.tokenizer, x.cfg, pool, x.registry)
    train_dapo(x.model, x.tokenizer, pool, x.data["general_train"], x.cfg.stage3, x.registry, x.out, x.seed,
               x.cfg.data.chat_kwargs, model_path=x.previous, reference=x.reference)


@dataclass(frozen=True)
class Stage:
    """One stage of RedOne 2.0: its config section, how it trains, and what it needs first
    (the previous stage's model; stage 1 starts from the base)."""

    name: str
    section: str  # the PipelineConfig field of its settings
    train: Callable[[StageInputs], None]
    rl: bool  # DAPO (may keep a KL reference) or SFT
    diagnoses: bool = False  # writes the capability map stage 2 reads


STAGES: dict[int, Stage] = {
    1: Stage("exploratory RL (DAPO)", "stage1", _exploratory_dapo, rl=True, diagnoses=True),
    2: Stage("targeted SFT", "stage2", _targeted_sft, rl=False),
    3: Stage("refinement RL (DAPO)", "stage3", _refinement_dapo, rl=True),
}


def run_stage(cfg: PipelineConfig, stage: int, registry: RewardRegistry | None = None) -> dict[str, Any]:
    """Train (or resume) one stage, save its model, evaluate it; returns its evaluation.
    Stage 0 evaluates the base model."""
    registry = registry or rewards_registry(cfg)
    out = stage_dir(cfg, stage)
    if is_done(cfg, stage):
        return json.loads((out / "eval.json").read_text())
    data = _load_data(cfg, registry)
    if stage == 0:
        base = prepare_base(cfg)
        result = evaluate_model(cfg, base, load_tokenizer(base), data["eval"], registry)
        _finish(out, result)
        return result
    spec = STAGES[stage]
    if stage > 1 and not is_done(cfg, stage - 1):
        raise ConfigError(f"stage {stage} needs stage {stage - 1} first (no {stage_dir(cfg, stage - 1)}/done.json)")
    previous = prepare_base(cfg) if stage == 1 else model_dir(cfg, stage - 1)
    logger.info("stage %d: %s from %s", stage, spec.name, previous)
    section = getattr(cfg, spec.section)
    tokenizer = load_tokenizer(previous)
    model = build_policy(cfg.model, tokenizer, previous)
    if section.general_mode == "projector":
        untie_embeddings(model)  # the regularizer's ghost path refuses tied weights
    model = shard_policy(model, cfg.model)
    reference = None
    if spec.rl and section.kl_coef:
        reference = shard_policy(build_policy(cfg.model, tokenizer, previous), cfg.model)
        reference.requires_grad_(False)
    spec.train(StageInputs(cfg, model, tokenizer, data, registry, out, cfg.seed * 1000 + stage, previous, reference))
    save_policy(model, tokenizer, out / "model")
    result = evaluate_tasks(model, tokenizer, data["eval"], registry, cfg.eval, cfg.data.chat_kwargs)
    if spec.diagnoses and rank_and_world()[0] == 0:
        write_capability_map(capability_map(result, cfg.diagnose), out)
    _finish(out, result)
    return result


def _finish(out: Path, result: dict[str, Any]) -> None:
    _write_json(out / "eval.json", result)
    _write_json(out / "done.json", {"sns_avg": result["sns_avg"], "general_avg": result["general_avg"]})
    barrier()  # other ranks read done.json and the capability map next


def run_pipeline(cfg: PipelineConfig, stages: tuple[int, ...] = (0, 1, 2, 3),
                 registry: RewardRegistry | None = None,
                 resume_force: bool = False) -> dict[int, dict[str, Any]]:
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file, expected a directory")
    check_resume(cfg, resume_force)  # before config.yaml is rewritten
    world = rank_and_world()[1]
    for key in ("stage1", "stage3"):  # before stage 1 trains, not when stage 3 starts
        if 1 in stages or 3 in stages:
            check_prompt_split(getattr(cfg, key), world, key)
    registry = registry or rewards_registry(cfg)
    if rank_and_world()[0] == 0:
        save_config(cfg, cfg.run_dir)
    return {stage: run_stage(cfg, stage, registry) for stage in stages}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, example="stage1.lr=1e-5")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3],
                        help="run only this stage (earlier ones must be done)")
    parser.add_argument("--resume-force", action="store_true",
                        help="resume a stage even though its settings changed since it started")


def run(args: argparse.Namespace) -> int:
    init_distributed()
    cfg = config_from_args(PipelineConfig, args)
    stages = (args.stage,) if args.stage else (0, 1, 2, 3)
    results = run_pipeline(cfg, stages, resume_force=args.resume_force)
    if rank_and_world()[0] == 0:
        for stage, result in results.items():
            print(f"== {'base' if stage == 0 else f'stage {stage}'} ==")
            print(format_scores(result))
    return 0
