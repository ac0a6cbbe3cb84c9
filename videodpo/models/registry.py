"""The model families videodpo trains, and the diffusers pipelines that name them."""

from __future__ import annotations

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
