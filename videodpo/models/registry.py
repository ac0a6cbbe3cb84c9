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
