"""Adapters over diffusers video transformers, one interface per model family.

`load_adapter(path)` opens either a diffusers pipeline directory (Wan2.1 / CogVideoX,
T2V or I2V, told apart by `model_index.json`) or a pixel-space model of the synthetic
world saved by `VideoModelAdapter.save_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

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
__all__ = ["ADAPTERS", "Conditions", "VideoModelAdapter", "load_adapter", "objective_for"]


def objective_for(family: str, scheduler: object, flow_shift: float = 1.0) -> DiffusionObjective:
    """Flow matching for Wan; the scheduler's prediction type and alphas for CogVideoX."""
    if family == "wan":
        return DiffusionObjective("flow_matching", shift=flow_shift)
    kind = scheduler.config.prediction_type
    return DiffusionObjective(kind, alphas_cumprod=scheduler.alphas_cumprod.clone())


def load_adapter(path: str | Path, dtype: torch.dtype = torch.float32, flow_shift: float = 1.0) -> VideoModelAdapter:
    """The adapter for a local model directory (no hub downloads)."""
    path = Path(path)
    meta = read_pixel_meta(path)
    if meta is not None:
        from videodpo.models.tiny import CaptionEncoder

        cls = ADAPTERS[meta["family"]]
        transformer = cls.transformer_class.from_pretrained(path / "transformer", torch_dtype=dtype)
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_pretrained(path / "scheduler")
        captions = CaptionEncoder(**meta["caption_encoder"])
        objective = objective_for(meta["family"], scheduler, flow_shift)
        return cls(transformer, scheduler, meta["task"], objective, captions, pipeline=None, pixel_meta=meta)
    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{path}: not a model directory (no model_index.json or videodpo_model.json)")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in PIPELINES:
        raise ConfigError(f"{index}: pipeline {class_name!r} is not supported; expected one of {sorted(PIPELINES)}")
    family, task = PIPELINES[class_name]
    pipe = getattr(diffusers, class_name).from_pretrained(path, torch_dtype=dtype)
    cls = ADAPTERS[family]
    max_len = 512 if family == "wan" else pipe.transformer.config.max_text_seq_length

    def encode(prompts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_len)[0]

    objective = objective_for(family, pipe.scheduler, flow_shift)
    return cls(pipe.transformer, pipe.scheduler, task, objective, encode, pipeline=pipe)
