"""The model families videodpo trains, and the diffusers pipelines that name them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from videodpo.models.base import VideoModelAdapter
from videodpo.models.cogvideox import CogVideoXAdapter
from videodpo.models.wan import WanAdapter

ADAPTERS: dict[str, type[VideoModelAdapter]] = {"wan": WanAdapter, "cogvideox": CogVideoXAdapter}
PIPELINES: dict[str, tuple[str, str]] = {
    "WanPipeline": ("wan", "t2v"),
    "WanImageToVideoPipeline": ("wan", "i2v"),
    "CogVideoXPipeline": ("cogvideox", "t2v"),
    "CogVideoXImageToVideoPipeline": ("cogvideox", "i2v"),
}
PIPELINE_CLASSES: dict[tuple[str, str], str] = {v: k for k, v in PIPELINES.items()}


def read_pipeline_index(folder: str | Path, what: str = "model") -> tuple[Path, dict[str, Any]]:
    """`model_index.json` of a diffusers pipeline folder of a supported class: (its path,
    its contents); a ConfigError naming the folder otherwise."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{what} '{folder}': not a diffusers pipeline folder (no model_index.json)")
    config = json.loads(index.read_text())
    if config.get("_class_name") not in PIPELINES:
        raise ConfigError(f"{index}: pipeline {config.get('_class_name')!r} is not supported; "
                          f"expected one of {sorted(PIPELINES)}")
    return index, config


def resolve_task(config: dict[str, Any], task: str | None, key: str, where: str | Path) -> str:
    """The task a pipeline folder (its `model_index.json` as `config`) serves: its class's,
    unless `task` asks for the other one, which only a model with `expand_timesteps`
    allows (Wan2.2 TI2V-5B: one transformer for text- and image-to-video, saved as
    `WanPipeline`). `key` names the setting in the error."""
    class_name = config["_class_name"]
    saved = PIPELINES[class_name][1]
    if task in (None, "", "auto", saved):
        return saved
    if not config.get("expand_timesteps"):
        raise ConfigError(f"{key}={task}: {where} holds a {saved} pipeline ({class_name}); only a model "
                          "with expand_timesteps (Wan2.2 TI2V) serves both tasks")
    return task
