"""`videodpo train`: SFT, Diffusion-DPO and Reg-DPO on GT-Pairs, one process or many.

The loop reads top to bottom: set up the training state (`videodpo.state`: policy,
reference, parallel layout, optimizer), open the pairs and their prefetching loader,
resume from the latest checkpoint if asked (`common.run.TrainingRun`), then per step take
`train.grad_accum` micro-batches, run `videodpo.step.training_step` (or the
data-regularized step of `videodpo.regularized_step`), and let the run log, validate
and checkpoint as scheduled. Checkpoints hold model,
optimizer, LR schedule, data position and RNG, so `--resume` continues bit for bit.
At the end `videodpo.export` writes the model.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from common.config import add_config_args, check_run_dir, config_from_args, save_config
from common.errors import ConfigError
from common.run import Attributes, GeneratorState, RunResult, TrainingRun
from videodpo.config import RunConfig
from videodpo.data.dataset import CachedPairDataset, PairDataset
from videodpo.data.loader import PairLoader, PairSampler
from videodpo.data.pairs import collate_pairs, encode_item
from videodpo.export import export_model
from videodpo.models import VideoModelAdapter
from videodpo.regularized_step import GeneralClips, build_video_regularizer, general_training_step
from videodpo.state import TrainingState, build_training_state
from videodpo.step import training_step
from videodpo.validation import Validator

logger = logging.getLogger(__name__)
HELP = "SFT / DPO / Reg-DPO training of a video diffusion transformer on preference pairs"


@dataclass
class TrainResult(RunResult):
    """`common.run.RunResult` (run_dir, steps, history) and what the video run adds."""

    export_dir: Path | None = None
    skipped_rows: int = 0
    nonfinite_steps: int = 0


def open_training_data(cfg: RunConfig, adapter: VideoModelAdapter) -> Any:
    """The map-style pair dataset named by `data.latent_cache` or `data.manifest`."""
    bad = cfg.data.max_bad_row_fraction
    if cfg.data.latent_cache:
        return CachedPairDataset(cfg.data.latent_cache, expect_model=cfg.model.path or None, max_bad_fraction=bad)
    if not cfg.data.manifest:
        raise ConfigError("data.manifest or data.latent_cache: set one to the training pairs")
    return PairDataset(cfg.data.manifest, num_frames=cfg.data.num_frames or None,
                       height=cfg.data.height or None, width=cfg.data.width or None,
                       with_first_frame=adapter.task == "i2v", max_bad_fraction=bad)


RESUME_KEYS = ("model.path", "model.task", "model.dtype", "model.flow_shift", "loss", "lora", "optim",
               "parallel.dp_shard", "parallel.cp", "parallel.cp_mode", "parallel.pair", "parallel.fsdp",
               "parallel.param_dtype", "train.steps", "train.batch_size", "train.grad_accum",
               "train.seed", "train.experts", "data.manifest", "data.latent_cache", "data.num_frames", "data.height",
               "data.width", "regularizer")


def train(
    cfg: RunConfig,
    resume: bool = False,
    dataset: Any = None,
    adapter: VideoModelAdapter | None = None,
    validator: Callable[[TrainingState], dict[str, float]] | None = None,
    resume_force: bool = False,
    general_clips: Any = None,
) -> TrainResult:
    """Train as `cfg` says. `dataset` / `adapter` replace the ones `cfg` names (the demo
    passes in-memory ones); `general_clips` (a `videodpo.regularized_step.GeneralClips`)
    replaces the general clips `regularizer` names."""
    out_dir = Path(cfg.out_dir)
    # Before anything is built: out_dir must be a folder; a resume must match the saved config.
    check_run_dir(cfg, out_dir, "out_dir", RESUME_KEYS if resume else None, resume_force)
    state = build_training_state(cfg, adapter)
    layout = state.layout
    if cfg.regularizer.mode != "off" and general_clips is None:
        general_clips = GeneralClips.open(cfg, state.adapter)
    regularizer = build_video_regularizer(state)
    dataset = open_training_data(cfg, state.adapter) if dataset is None else dataset
    if cfg.train.batch_size * layout.dp_size > len(dataset):
        logger.warning("train.batch_size %d on %d data-parallel ranks is more than the %d pairs of the data; "
                       "pairs repeat within a step", cfg.train.batch_size, layout.dp_size, len(dataset))
    sampler = PairSampler(len(dataset), cfg.train.seed, layout.dp_rank, layout.dp_size)
    # Encoders on the CPU (no GPU): the loader's workers encode each row as they read it.
    encode_in_workers = cfg.data.num_workers > 0 and state.adapter.encoder_device.type == "cpu"
    loader = PairLoader(dataset, cfg.train.batch_size, sampler, functools.partial(collate_pairs, state.adapter),
                        cfg.data.max_bad_row_fraction, cfg.data.num_workers, cfg.data.prefetch_factor,
                        transform=functools.partial(encode_item, state.adapter) if encode_in_workers else None)
    run = TrainingRun(out_dir, cfg.train.steps, model=state.policy, optimizer=state.optimizer,
                      scheduler=state.scheduler, log_every=cfg.train.log_every,
                      checkpoint_every=cfg.train.checkpoint_every, validate_every=cfg.validation.every,
                      keep_checkpoints=cfg.train.keep_checkpoints, is_main=layout.is_main,
                      desc=f"train {cfg.loss.kind}",
                      stateful={"data": loader, "generator": GeneratorState(state.generator),
                                "counters": Attributes(state, "step", "nonfinite")})
    try:
        if resume and run.resume() == 0:
            logger.info("--resume: no checkpoint under %s, starting from step 0", run.checkpointer.root)
        if layout.is_main:  # only now: a refused or failed resume leaves config.yaml as it was
            save_config(cfg, out_dir)
        if validator is None and cfg.validation.every:
            validator = Validator(cfg, state.adapter)

        validate = functools.partial(validator, state) if validator is not None else None

        while run.step < cfg.train.steps:
            batches = [loader.next_batch() for _ in range(cfg.train.grad_accum)]
            if cfg.regularizer.mode != "off":
                metrics = general_training_step(state, batches, general_clips, regularizer)
            else:
                metrics = training_step(state, batches)
            metrics["skipped_rows"] = float(loader.skipped_rows)
            run.end_step(metrics, validate)
    finally:  # also when killed by an exception: no loader workers or open logs left behind
        loader.close()
        run.finish()
    export_dir = export_model(state, out_dir / ("final_lora" if state.lora else "final"))
    layout.barrier()
    return TrainResult(out_dir, run.step, run.history, export_dir, loader.skipped_rows, state.nonfinite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, example="optim.lr=1e-5")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("--resume-force", action="store_true",
                        help="with --resume: continue even if the config differs from the saved one")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(RunConfig, args)
    result = train(cfg, resume=args.resume, resume_force=args.resume_force)
    if result.export_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"trained {result.steps} steps; model exported to {result.export_dir}")
    return 0
