"""Adapters over diffusers video transformers, one interface per model family.

`load_adapter(path)` opens either a diffusers pipeline directory (Wan2.1 / CogVideoX,
T2V or I2V, told apart by `model_index.json`) or a pixel-space model of the synthetic
world saved by `VideoModelAdapter.save_pretrained`. It loads what the run needs: the
transformer with or without its weights (meta device, filled later shard by shard) and
the encoders now or on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from common.errors import ConfigError
from videodpo.losses import DiffusionObjective
from videodpo.models.base import Conditions, VideoModelAdapter, read_pixel_meta
from videodpo.models.cogvideox import CogVideoXAdapter
from videodpo.models.wan import WanAdapter

ADAPTERS: dict[str, type[VideoModelAdapter]] = {"wan": WanAdapter, "cogvideox": CogVideoXAdapter}
PIPELINES: dict[str, tuple[str, str]] = {
    "WanPipeline": ("wan", "t2v"),
    "WanImageToVideoPipeline": ("wan", "i2v"),
    "CogVideoXPipeline": ("cogvideox", "t2v"),
    "CogVideoXImageToVideoPipeline": ("cogvideox", "i2v"),
}
__all__ = [
    "ADAPTERS",
    "Conditions",
    "VideoModelAdapter",
    "load_adapter",
    "load_encoder_pipeline",
    "objective_for",
    "transformer_skeleton",
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
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    if dtype != torch.float32:
        nn.Module.to(model, dtype)  # diffusers' own `to` warns about the fp32 modules
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, module in model.named_modules():
            if any(k in name.split(".") for k in keep):
                module.float()
    return model.eval()


def load_encoder_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The diffusers pipeline of `path` with VAE, text and image encoders, scheduler and
    tokenizer, and no transformer (`transformer=None`: nothing of it is read)."""
    index = Path(path) / "model_index.json"
    class_name = json.loads(index.read_text()).get("_class_name")
    pipe = getattr(diffusers, class_name).from_pretrained(path, transformer=None, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_adapter(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    flow_shift: float = 1.0,
    *,
    transformer_weights: bool = True,
    encoders: bool = True,
) -> VideoModelAdapter:
    """The adapter for a local model directory (no hub downloads).

    `transformer_weights=False` builds the transformer from its config on the meta
    device (`transformer_skeleton`): the trainer shards it and fills each rank's shard
    from the safetensors files. `encoders=False` constructs no VAE, text or image
    encoder now; the adapter loads them the first time it encodes (training from a
    latent cache never does).
    """
    path = Path(path)
    meta = read_pixel_meta(path)
    if meta is not None:
        from videodpo.models.tiny import CaptionEncoder

        cls = ADAPTERS[meta["family"]]
        transformer = _load_transformer(cls, path / "transformer", dtype, transformer_weights)
        scheduler = _load_scheduler(path / "scheduler")
        captions = CaptionEncoder(**meta["caption_encoder"])
        objective = objective_for(meta["family"], scheduler, flow_shift)
        return cls(transformer, scheduler, meta["task"], objective, captions, pipeline=None, pixel_meta=meta,
                   dtype=dtype)
    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{path}: not a model directory (no model_index.json or videodpo_model.json)")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in PIPELINES:
        raise ConfigError(f"{index}: pipeline {class_name!r} is not supported; expected one of {sorted(PIPELINES)}")
    family, task = PIPELINES[class_name]
    cls = ADAPTERS[family]
    transformer = _load_transformer(cls, path / "transformer", dtype, transformer_weights)
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
