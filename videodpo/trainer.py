"""`videodpo train`: SFT, Diffusion-DPO and Reg-DPO on GT-Pairs, one process or many.

The loop reads top to bottom: build the adapter (policy), its reference (a frozen copy,
or the policy with LoRA adapters disabled), parallelize from outside (FSDP2, context
and pair parallelism, activation checkpointing), then for each optimizer step draw one
shared timestep and noise per pair, compute the per-sample errors of policy and
reference, the loss of `videodpo.losses.reg_dpo_loss`, backward, clip, step. With
`train.grad_accum` > 1, FSDP2 reduce-scatters gradients only after the last
micro-batch. A step with a non-finite loss or gradient is skipped and counted; too
many abort the run. Checkpoints hold model, optimizer, LR schedule, data position
(`videodpo.data.loader.PairLoader`: worker processes read ahead) and RNG, so `--resume`
continues bit for bit. At the end the model is exported in diffusers format: LoRA
weights that `pipe.load_lora_weights` reads, or a full `save_pretrained` directory.

Set-up is host-lean (`build_training_state`): from a model folder only the
transformer and scheduler load when training reads a latent cache; under FSDP the
policy and reference are built on the meta device and every rank reads only its shard
of the safetensors weights.

For benchmarks and tools: `build_training_state(cfg, adapter=None) -> TrainingState`
and `build_training_step(cfg, adapter=None) -> (step_fn, state)`, where
`step_fn(batch_or_list_of_micro_batches)` runs one full optimizer step and returns its
metrics; `random_pair_batch(adapter, ...)` makes a batch of the right shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.config import add_config_args, check_run_dir, config_from_args, save_config
from common.errors import ConfigError, UserError
from videodpo.config import RunConfig
from videodpo.data.loader import PairLoader, PairSampler
from videodpo.losses import LOSS_KINDS, loss_weights, reg_dpo_loss
from videodpo.models import VideoModelAdapter, load_adapter, reference_skeleton, weights_for
from videodpo.models.base import Conditions
from videodpo.models.experts import (
    EXPERT_CHOICES,
    EXPERT_NAMES,
    EXPORT_DIRS,
    TimestepExperts,
    iter_expert_state,
    trained_experts,
)
from videodpo.parallel import ParallelLayout, build_layout

logger = logging.getLogger(__name__)
HELP = "SFT / DPO / Reg-DPO training of a video diffusion transformer on preference pairs"


# ---- batches ------------------------------------------------------------------------


@dataclass
class PairBatch:
    """Latents of the preferred (`chosen`) and rejected clips `(B, C, f, h, w)` and
    their shared conditions."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    cond: Conditions

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.chosen.to(device), self.rejected.to(device), {k: v.to(device) for k, v in self.cond.items()})


def collate_pairs(adapter: VideoModelAdapter, items: list[dict]) -> PairBatch:
    """Dataset items -> a `PairBatch`. An item holds `chosen` / `rejected` clips
    `(3, F, H, W)` in [-1, 1] (encoded here) or latents (`"latent": True`), a `caption`
    (or cached `text`), and for I2V a `first_frame` (or cached `image_latents`).
    Encoding runs on the adapter's encoder device (the training device)."""
    chosen = torch.stack([it["chosen"] for it in items])
    rejected = torch.stack([it["rejected"] for it in items])
    raw = "text" not in items[0] and not items[0].get("latent", False)  # clips, not cached latents
    cached_image = "image_latents" in items[0]
    if not raw and adapter.task == "i2v" and not cached_image:
        raise UserError("I2V training from latents needs cached image_latents")
    cond: Conditions = {}
    if "text" in items[0]:
        cond["text"] = torch.stack([it["text"] for it in items])
    if adapter.task == "i2v" and cached_image:
        for key in ("image_latents", "image_embeds"):
            if key in items[0]:
                cond[key] = torch.stack([it[key] for it in items])
    if raw or "text" not in cond:
        device = adapter.encoder_device
        with adapter.encoders_on_device():
            if raw:
                num_frames = chosen.shape[2]
                first = torch.stack([it.get("first_frame", it["chosen"][:, 0]) for it in items]).to(device)
                chosen, rejected = adapter.encode_video(chosen.to(device)), adapter.encode_video(rejected.to(device))
            if "text" not in cond:
                cond["text"] = adapter.encode_prompts([it["caption"] for it in items])
            if raw and adapter.task == "i2v" and not cached_image:
                cond.update(adapter.image_conditions(first, num_frames))
    return PairBatch(chosen, rejected, cond)


def encode_item(adapter: VideoModelAdapter, item: dict) -> dict:
    """One dataset item in the form a latent cache gives: latents and conditions (no batch
    dimension), encoded by `collate_pairs`; cached items come back as they are."""
    if "text" in item or item.get("latent", False):
        return item
    batch = collate_pairs(adapter, [item])
    return {"chosen": batch.chosen[0], "rejected": batch.rejected[0], **{k: v[0] for k, v in batch.cond.items()},
            **{k: item[k] for k in ("caption", "row", "meta") if k in item}}


def random_pair_batch(adapter: VideoModelAdapter, batch_size: int, num_frames: int, height: int, width: int,
                      seed: int = 0) -> PairBatch:
    """A batch of random latents and conditions of the right shapes (benchmarks, tests)."""
    g = torch.Generator().manual_seed(seed)
    cfg = adapter.transformer.config
    channels = cfg.out_channels or cfg.in_channels
    shape = (batch_size, channels, num_frames, height, width)
    text_dim = getattr(cfg, "text_dim", None) or cfg.text_embed_dim
    text_len = getattr(cfg, "max_text_seq_length", None) or 8
    cond: Conditions = {"text": torch.randn(batch_size, text_len, text_dim, generator=g)}
    if adapter.task == "i2v":
        extra = cfg.in_channels - channels  # mask + image channels; 0: the image is the first frame (TI2V)
        frames = num_frames if extra else 1
        cond["image_latents"] = torch.randn(batch_size, extra or channels, frames, height, width, generator=g)
    return PairBatch(torch.randn(shape, generator=g), torch.randn(shape, generator=g), cond)


# ---- the training state and one step -----------------------------------------------


@dataclass
class TrainingState:
    cfg: RunConfig
    adapter: VideoModelAdapter
    policy: nn.Module
    reference: nn.Module | None  # None with LoRA: the policy with adapters disabled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    layout: ParallelLayout
    generator: torch.Generator
    timestep_range: tuple[float, float | None] = (0.0, None)  # where training draws t (expert choice)
    step: int = 0
    nonfinite: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def lora(self) -> bool:
        return self.cfg.lora.enabled

    def reference_context(self) -> contextlib.AbstractContextManager:
        if self.reference is not None:
            return contextlib.nullcontext()
        return _adapters_disabled(self.policy)


@contextlib.contextmanager
def _adapters_disabled(model: nn.Module) -> Iterator[None]:
    experts = trained_experts(model).values()
    for expert in experts:
        expert.disable_adapters()
    try:
        yield
    finally:
        for expert in experts:
            expert.enable_adapters()


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over `warmup` steps, cosine to `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _add_lora(model: nn.Module, cfg: RunConfig) -> None:
    from peft import LoraConfig

    model.requires_grad_(False)
    for expert in trained_experts(model).values():  # one adapter per expert that trains
        expert.add_adapter(
            LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                       target_modules=list(cfg.lora.target_modules), init_lora_weights=True)
        )


def validate_config(cfg: RunConfig) -> None:
    if cfg.loss.kind not in LOSS_KINDS:
        raise ConfigError(f"loss.kind must be one of {LOSS_KINDS}, got {cfg.loss.kind!r}")
    if cfg.parallel.pair == 2 and cfg.loss.kind == "sft":
        raise ConfigError("parallel.pair=2 needs a preference loss (dpo or reg_dpo): SFT has one sample")
    if cfg.train.mixed_precision not in ("no", "bf16"):
        raise ConfigError(f"train.mixed_precision must be 'no' or 'bf16', got {cfg.train.mixed_precision!r}")
    if cfg.model.task not in ("", "t2v", "i2v"):
        raise ConfigError(f"model.task must be empty (the pipeline's), t2v or i2v, got {cfg.model.task!r}")
    if cfg.train.experts not in EXPERT_CHOICES:
        raise ConfigError(f"train.experts must be one of {sorted(EXPERT_CHOICES)}, got {cfg.train.experts!r}")
    if cfg.lora.export_format not in ("diffusers", "original", "both"):
        raise ConfigError(f"lora.export_format must be diffusers, original or both, got {cfg.lora.export_format!r}")
    if cfg.train.grad_accum < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.grad_accum and train.batch_size must be >= 1")
    from videodpo.regularized_step import check_regularizer

    check_regularizer(cfg)


def build_training_state(cfg: RunConfig, adapter: VideoModelAdapter | None = None) -> TrainingState:
    """Adapter, reference, parallel wrapping, optimizer and LR schedule for `cfg`.

    With `adapter` None the model comes from `cfg.model.path`, loading only what the run
    needs: no VAE or encoder when training reads `data.latent_cache` (they load on
    first use, e.g. for validation clips); encoders go to the training device
    (`model.offload_encoders` keeps them on the CPU between uses). The policy and the
    frozen reference are built on the meta device; under FSDP they are sharded first and
    each rank then reads from the transformer's safetensors files only the rows it keeps
    (`common.fsdp.load_weights`), so no rank holds a full copy; without FSDP they are
    allocated on the training device and filled a tensor at a time. A given in-memory
    `adapter` (tests, the demo, benchmarks) is sharded from memory, and its reference is
    filled from its tensors the same way, never `deepcopy`-ed. With LoRA the reference
    is the policy with adapters disabled, and the LoRA weights start from
    `init_lora_weights(policy, cfg.train.seed)` on every path.
    """
    from common.fsdp import StateDictWeights, to_dtype

    validate_config(cfg)
    layout = build_layout(cfg.parallel)
    if adapter is None:
        if not cfg.model.path:
            raise ConfigError("model.path: set it to a local diffusers model directory")
        adapter = load_adapter(cfg.model.path, dtype=to_dtype(cfg.model.dtype), flow_shift=cfg.model.flow_shift,
                               transformer_weights=False, encoders=not cfg.data.latent_cache,
                               task=cfg.model.task)
        weights: Any = weights_for(cfg.model.path, adapter.transformer)
    else:
        weights = StateDictWeights(dict(adapter.transformer.state_dict()))
    adapter.place_encoders(layout.device, offload=cfg.model.offload_encoders)
    if adapter.objective.kind == "flow_matching":
        adapter.objective.shift = cfg.model.flow_shift
    policy = adapter.transformer
    timestep_range: tuple[float, float | None] = (0.0, None)
    if isinstance(policy, TimestepExperts):
        if cfg.regularizer.mode != "off":
            raise ConfigError("regularizer.mode: the data regularizer is not supported for two-expert models "
                              "(transformer_2) yet; set regularizer.mode=off")
        policy.train_experts(cfg.train.experts)
        timestep_range = policy.timestep_range()
    elif cfg.train.experts != "both":
        raise ConfigError(f"train.experts={cfg.train.experts}: {cfg.model.path or 'the model'} has one "
                          "transformer; high / low need a two-expert model (transformer_2, boundary_ratio)")
    reference = None
    if cfg.lora.enabled:
        _add_lora(policy, cfg)
        for expert in trained_experts(policy).values():
            lora_modules = sorted({n.split(".lora_A.")[0] for n, _ in expert.named_parameters() if ".lora_A." in n})
            adapter.check_lora_export(cfg.lora.export_format, lora_modules)
    elif cfg.loss.kind != "sft":
        reference = reference_skeleton(policy, adapter.dtype)
    _place_model(layout, cfg, policy, weights, trainable=True)
    if reference is not None:
        _place_model(layout, cfg, reference, weights, trainable=False)
    del weights  # the in-memory source's full tensors go once both models hold theirs
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    factor = warmup_cosine(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # Pair and cp ranks of one data rank must draw the same timesteps and noise.
    generator = torch.Generator().manual_seed(cfg.train.seed + 7919 * layout.dp_rank)
    return TrainingState(cfg, adapter, policy, reference, optimizer, scheduler, layout, generator, timestep_range)


def _place_model(layout: ParallelLayout, cfg: RunConfig, model: nn.Module, weights: Any, trainable: bool) -> None:
    """Parallelize `model` and, when it is on the meta device, fill it from `weights`:
    under FSDP after sharding (each rank allocates and reads its shard only), otherwise
    before (the replicated path broadcasts rank 0's weights)."""
    from common.fsdp import load_weights, materialize

    on_meta = any(p.is_meta for p in model.parameters())
    offload = cfg.parallel.reference_cpu_offload and not trainable and layout.sharded(cfg.parallel)
    device = torch.device("cpu") if offload else layout.device

    def fill() -> None:
        materialize(model, device)
        missing = load_weights(model, weights, rename=_base_layer_key)
        unexpected = [n for n in missing if ".lora_" not in n]
        if unexpected:
            source = getattr(weights, "folder", "the in-memory model")
            raise UserError(f"{source}: no weights for {unexpected[:3]} ({len(unexpected)} missing); "
                            "is model.path the model this run was set up for?")

    if layout.sharded(cfg.parallel):
        if not on_meta:
            model.to(layout.device)
        layout.parallelize(model, cfg.parallel, trainable=trainable)
        if on_meta:
            fill()
    else:
        if on_meta:
            fill()
        else:
            model.to(layout.device)
        layout.parallelize(model, cfg.parallel, trainable=trainable)
    if cfg.lora.enabled and trainable:
        init_lora_weights(model, cfg.train.seed)


def _base_layer_key(name: str) -> str:
    """A LoRA-wrapped layer's weight is `x.base_layer.weight`; the file holds `x.weight`."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """peft's default LoRA start, drawn from one seeded generator in name order: A
    uniform in +-1/sqrt(fan_in) (kaiming-uniform, a = sqrt 5), B zero. The same values on
    every rank and every set-up path (sharded parameters take their rows)."""
    from common.fsdp import StateDictWeights, load_weights

    g = torch.Generator().manual_seed(seed)
    values = {}
    for name, p in sorted(model.named_parameters()):
        if ".lora_A." in name:
            values[name] = (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(p.shape[1])
        elif ".lora_B." in name:
            values[name] = torch.zeros(p.shape)
    load_weights(model, StateDictWeights(values))


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
            from common.fsdp import drop_unsynced_gradients

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


# ---- the run ------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    history: list[dict]
    export_dir: Path | None
    skipped_rows: int = 0
    nonfinite_steps: int = 0


def open_training_data(cfg: RunConfig, adapter: VideoModelAdapter) -> Any:
    """The map-style pair dataset named by `data.latent_cache` or `data.manifest`."""
    from videodpo.data.dataset import CachedPairDataset, PairDataset

    bad = cfg.data.max_bad_row_fraction
    if cfg.data.latent_cache:
        return CachedPairDataset(cfg.data.latent_cache, expect_model=cfg.model.path or None, max_bad_fraction=bad)
    if not cfg.data.manifest:
        raise ConfigError("data.manifest or data.latent_cache: set one to the training pairs")
    return PairDataset(cfg.data.manifest, num_frames=cfg.data.num_frames or None,
                       height=cfg.data.height or None, width=cfg.data.width or None,
                       with_first_frame=adapter.task == "i2v", max_bad_fraction=bad)


def export_model(state: TrainingState, out_dir: Path) -> Path:
    """LoRA weights (`lora.export_format`), or a full `save_pretrained` directory. A
    two-expert model's LoRAs go one folder per trained expert (`high_noise/`,
    `low_noise/`), each loadable with `pipe.load_lora_weights` (the low-noise one with
    `load_into_transformer_2=True`); its full export holds both transformers."""
    from common.fsdp import full_state_dict

    full = full_state_dict(state.policy) if state.layout.world_size > 1 else None
    if not state.layout.is_main:
        return out_dir
    if state.lora:
        from peft.utils import get_peft_model_state_dict

        two = isinstance(state.policy, TimestepExperts)
        for name, expert in trained_experts(state.policy).items():
            part = None if full is None else dict(iter_expert_state(full, name)) if two else full
            sd = get_peft_model_state_dict(expert, state_dict=part)
            metadata = expert.peft_config["default"].to_dict()  # lora_alpha: the loaded scale
            state.adapter.save_lora(out_dir / EXPORT_DIRS[name] if two else out_dir, sd, metadata,
                                    state.cfg.lora.export_format)
        return out_dir
    model = state.policy
    if full is not None:
        model = _unsharded_copy(type(state.adapter).transformer_class, state.policy, full)
    return state.adapter.save_pretrained(out_dir, transformer=model)


def _unsharded_copy(cls: type[nn.Module], model: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """A plain `cls` (FSDP2 changes the wrapped model's class) holding the tensors `full`;
    for two experts, one `cls` each."""
    if isinstance(model, TimestepExperts):
        parts = {n: cls.from_config(e.config) for n, e in model.experts.items()}
        copy = TimestepExperts(parts, model.boundary, model.num_train_timesteps)
    else:
        copy = cls.from_config(model.config)
    copy.load_state_dict(full)
    return copy


# Settings that change what a checkpoint means: a resume with other values stops.
# (Memory knobs such as activation checkpointing or offloading may change.)
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
    stop_after: int | None = None,
    validator: Callable[[TrainingState], dict[str, float]] | None = None,
    resume_force: bool = False,
    general_clips: Any = None,
) -> TrainResult:
    """Train as `cfg` says. `dataset` / `adapter` replace the ones `cfg` names (the demo
    passes in-memory ones); `stop_after` ends the process early as a kill would, after
    that step's checkpoint. `general_clips` (a `videodpo.regularized_step.GeneralClips`)
    replaces the general clips `regularizer` names."""
    from common.checkpoint import Checkpointer, trim_metrics_log
    from common.metrics import MetricsLogger, progress

    out_dir = Path(cfg.out_dir)
    # Before anything is built: out_dir must be a folder; a resume must match the saved config.
    check_run_dir(cfg, out_dir, "out_dir", RESUME_KEYS if resume else None, resume_force)
    state = build_training_state(cfg, adapter)
    layout = state.layout
    from videodpo.regularized_step import (
        GeneralClips,
        build_video_regularizer,
        general_training_step,
    )

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
    checkpointer = Checkpointer(out_dir / "checkpoints", keep_last=cfg.train.keep_checkpoints)
    if resume:
        extra: dict = {}
        step = checkpointer.load(model=state.policy, optimizer=state.optimizer, scheduler=state.scheduler,
                                 extra=extra)
        if step is None:
            logger.info("--resume: no checkpoint under %s, starting from step 0", checkpointer.root)
        else:
            state.step, state.nonfinite = step, int(extra["nonfinite"])
            loader.load_state_dict(extra["data"])
            state.generator.set_state(extra["generator"])
            logger.info("resumed from step %d", step)
    if layout.is_main:  # only now: a refused or failed resume leaves config.yaml as it was
        save_config(cfg, out_dir)
        if resume:
            trim_metrics_log(out_dir, state.step)  # the steps after the checkpoint run again
    metrics_log = MetricsLogger(out_dir, enabled=layout.is_main)
    if validator is None and cfg.validation.every:
        from videodpo.validation import Validator

        validator = Validator(cfg, state.adapter)
    bar = progress(total=cfg.train.steps, desc=f"train {cfg.loss.kind}")
    bar.update(state.step)
    while state.step < cfg.train.steps:
        batches = [loader.next_batch() for _ in range(cfg.train.grad_accum)]
        if cfg.regularizer.mode != "off":
            metrics = general_training_step(state, batches, general_clips, regularizer)
        else:
            metrics = training_step(state, batches)
        metrics["skipped_rows"] = float(loader.skipped_rows)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            metrics_log.log(state.step, metrics)
        state.history.append({"step": state.step, **metrics})
        if validator is not None and cfg.validation.every and state.step % cfg.validation.every == 0:
            metrics_log.log(state.step, {f"val/{k}": v for k, v in validator(state).items()})
        bar.update(1)
        every = cfg.train.checkpoint_every
        if (every and state.step % every == 0) or state.step == cfg.train.steps:
            checkpointer.save(state.step, model=state.policy, optimizer=state.optimizer, scheduler=state.scheduler,
                              extra={"data": loader.state_dict(), "nonfinite": state.nonfinite,
                                     "generator": state.generator.get_state()})
        if stop_after is not None and state.step >= stop_after:
            loader.close()
            bar.close()
            metrics_log.close()
            return TrainResult(out_dir, state.step, state.history, None, loader.skipped_rows, state.nonfinite)
    bar.close()
    loader.close()
    export_dir = export_model(state, out_dir / ("final_lora" if state.lora else "final"))
    metrics_log.close()
    layout.barrier()
    return TrainResult(out_dir, state.step, state.history, export_dir, loader.skipped_rows, state.nonfinite)


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
