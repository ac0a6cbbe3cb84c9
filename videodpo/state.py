"""The training state of a videodpo run, and how it is set up from a config.

`build_training_state(cfg, adapter=None) -> TrainingState`: the policy (the adapter's
transformer, with LoRA adapters when `lora.enabled`), its frozen reference (a copy on
the meta device filled from the same weights, or with LoRA the policy with adapters
disabled), the parallel layout applied from outside (FSDP2, context and pair
parallelism, activation checkpointing), AdamW and its LR schedule, and the generator
that draws timesteps and noise.

Set-up is host-lean: from a model folder only the transformer and scheduler load when
training reads a latent cache; under FSDP the policy and reference are built on the
meta device and every rank reads only its shard of the safetensors weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from common.config import check_config
from common.errors import ConfigError, UserError
from common.fsdp import StateDictWeights, load_weights, materialize, to_dtype
from common.run import build_lr_scheduler, build_optimizer, seed_for_rank
from videodpo.config import RunConfig
from videodpo.models import VideoModelAdapter, load_adapter, reference_skeleton, weights_for
from videodpo.models.experts import TimestepExperts, trained_experts
from videodpo.parallel import ParallelLayout, build_layout
from videodpo.regularized_step import check_regularizer


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


def add_lora(model: nn.Module, cfg: RunConfig) -> None:
    model.requires_grad_(False)
    for expert in trained_experts(model).values():  # one adapter per expert that trains
        expert.add_adapter(
            LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                       target_modules=list(cfg.lora.target_modules), init_lora_weights=True)
        )


def validate_config(cfg: RunConfig) -> None:
    """One-line ConfigErrors before anything is built: every field's type, choice and
    range (`common.config.check_config`, also for configs made in code), then the
    combinations that cannot run."""
    check_config(cfg)
    if cfg.parallel.pair == 2 and cfg.loss.kind == "sft":
        raise ConfigError("parallel.pair=2 needs a preference loss (dpo or reg_dpo): SFT has one sample")
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
        add_lora(policy, cfg)
        for expert in trained_experts(policy).values():
            lora_modules = sorted({n.split(".lora_A.")[0] for n, _ in expert.named_parameters() if ".lora_A." in n})
            adapter.check_lora_export(cfg.lora.export_format, lora_modules)
    elif cfg.loss.kind != "sft":
        reference = reference_skeleton(policy, adapter.dtype)
    _place_model(layout, cfg, policy, weights, trainable=True)
    if reference is not None:
        _place_model(layout, cfg, reference, weights, trainable=False)
    del weights  # the in-memory source's full tensors go once both models hold theirs
    optimizer = build_optimizer((p for p in policy.parameters() if p.requires_grad), cfg.optim.lr,
                                cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    scheduler = build_lr_scheduler(optimizer, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    # Pair and cp ranks of one data rank must draw the same timesteps and noise.
    generator = torch.Generator().manual_seed(seed_for_rank(cfg.train.seed, layout.dp_rank))
    return TrainingState(cfg, adapter, policy, reference, optimizer, scheduler, layout, generator, timestep_range)


def _place_model(layout: ParallelLayout, cfg: RunConfig, model: nn.Module, weights: Any, trainable: bool) -> None:
    """Parallelize `model` and, when it is on the meta device, fill it from `weights`:
    under FSDP after sharding (each rank allocates and reads its shard only), otherwise
    before (the replicated path broadcasts rank 0's weights)."""
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
    g = torch.Generator().manual_seed(seed)
    values = {}
    for name, p in sorted(model.named_parameters()):
        if ".lora_A." in name:
            values[name] = (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(p.shape[1])
        elif ".lora_B." in name:
            values[name] = torch.zeros(p.shape)
    load_weights(model, StateDictWeights(values))
