"""Adapters over diffusers video transformers, one interface per model family.

`load_adapter(path)` opens either a diffusers pipeline directory (Wan2.1 / Wan2.2 /
CogVideoX, T2V or I2V, told apart by `model_index.json`) or a pixel-space model of the
synthetic world saved by `VideoModelAdapter.save_pretrained`. It loads what the run
needs: the transformer with or without its weights (meta device, filled later shard by
shard) and the encoders now or on first use. A pipeline with `transformer_2` and
`boundary_ratio` (Wan2.2 A14B) gives one `TimestepExperts` holding both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import init_empty_weights
from torch import nn

from common.fsdp import SafetensorsWeights
from videodpo.models.base import (
    Conditions,
    VideoModelAdapter,
    load_encoder_pipeline,
    read_pixel_meta,
)
from videodpo.models.experts import ExpertWeights, TimestepExperts
from videodpo.models.registry import ADAPTERS, PIPELINES, read_pipeline_index, resolve_task
from videodpo.models.tiny import CaptionEncoder
from videodpo.objective import DiffusionObjective

__all__ = [
    "ADAPTERS",
    "PIPELINES",
    "Conditions",
    "VideoModelAdapter",
    "load_adapter",
    "load_encoder_pipeline",
    "objective_for",
    "reference_skeleton",
    "transformer_skeleton",
    "weights_for",
]


def objective_for(family: str, scheduler: object, flow_shift: float = 1.0) -> DiffusionObjective:
    """Flow matching for Wan; the scheduler's prediction type and alphas for CogVideoX."""
    if family == "wan":
        return DiffusionObjective("flow_matching", shift=flow_shift)
    kind = scheduler.config.prediction_type
    return DiffusionObjective(kind, alphas_cumprod=scheduler.alphas_cumprod.clone())


def transformer_skeleton(cls: type[nn.Module], config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`cls` built from `config` with its parameters on the meta device (no memory) and
    its buffers real (rotary tables are computed in `__init__` and are in no weight
    file). Modules diffusers keeps in fp32 (`_keep_in_fp32_modules`) stay fp32."""
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    if dtype != torch.float32:
        nn.Module.to(model, dtype)  # diffusers' own `to` warns about the fp32 modules
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, module in model.named_modules():
            if any(k in name.split(".") for k in keep):
                module.float()
    return model.eval()


def reference_skeleton(policy: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen copy's shape of `policy` on the meta device: the same transformer class and
    config, or for two experts only those that train (the others never see a training t)."""
    if isinstance(policy, TimestepExperts):
        parts = {n: transformer_skeleton(type(e), e.config, dtype) for n, e in policy.experts.items()
                 if n in policy.trained}
        return TimestepExperts(parts, policy.boundary, policy.num_train_timesteps).requires_grad_(False)
    return transformer_skeleton(type(policy), policy.config, dtype).requires_grad_(False)


def weights_for(path: str | Path, model: nn.Module) -> Any:
    """The safetensors weights of `model`'s transformer folders under pipeline dir `path`."""
    path = Path(path)
    if isinstance(model, TimestepExperts):
        return ExpertWeights({name: SafetensorsWeights(path / name) for name in model.experts})
    return SafetensorsWeights(path / "transformer")


def load_adapter(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    flow_shift: float = 1.0,
    *,
    transformer_weights: bool = True,
    encoders: bool = True,
    task: str | None = None,
) -> VideoModelAdapter:
    """The adapter for a local model directory (no hub downloads).

    `transformer_weights=False` builds the transformer from its config on the meta
    device (`transformer_skeleton`): the trainer shards it and fills each rank's shard
    from the safetensors files. `encoders=False` constructs no VAE, text or image
    encoder now; the adapter loads them the first time it encodes (training from a
    latent cache never does). `task` overrides the pipeline class's task where one
    transformer serves both (Wan2.2 TI2V-5B, `expand_timesteps`: saved as `WanPipeline`,
    trained as image-to-video with `task="i2v"`).
    """
    path = Path(path)
    meta = read_pixel_meta(path)
    if meta is not None:
        cls = ADAPTERS[meta["family"]]
        transformer = _load_transformer(cls, path / "transformer", dtype, transformer_weights)
        scheduler = _load_scheduler(path / "scheduler")
        captions = CaptionEncoder(**meta["caption_encoder"])
        objective = objective_for(meta["family"], scheduler, flow_shift)
        return cls(transformer, scheduler, meta["task"], objective, captions, pipeline=None, pixel_meta=meta,
                   dtype=dtype)
    index, config = read_pipeline_index(path, "model.path (nor a videodpo_model.json)")
    class_name = config["_class_name"]
    family = PIPELINES[class_name][0]
    task = resolve_task(config, task, "model.task", index)
    cls = ADAPTERS[family]
    transformer = _load_transformer(cls, path / "transformer", dtype, transformer_weights)
    if config.get("boundary_ratio") is not None and any(config.get("transformer_2") or ()):
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        second = _load_transformer(cls, path / "transformer_2", dtype, transformer_weights)
        transformer = TimestepExperts({"transformer": transformer, "transformer_2": second},
                                      boundary=float(config["boundary_ratio"]) * steps, num_train_timesteps=steps)
    pipe = load_encoder_pipeline(path, dtype) if encoders else None
    scheduler = pipe.scheduler if pipe is not None else _load_scheduler(path / "scheduler")
    objective = objective_for(family, scheduler, flow_shift)
    return cls(transformer, scheduler, task, objective, pipeline=pipe, model_dir=path, dtype=dtype)


def _load_transformer(cls: type[VideoModelAdapter], folder: Path, dtype: torch.dtype, weights: bool) -> nn.Module:
    if weights:
        return cls.transformer_class.from_pretrained(folder, torch_dtype=dtype)
    return transformer_skeleton(cls.transformer_class, cls.transformer_class.load_config(folder), dtype)


def _load_scheduler(folder: Path) -> Any:
    config = json.loads((folder / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_pretrained(folder)
