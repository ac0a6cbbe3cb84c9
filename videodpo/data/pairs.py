"""Batches of preference pairs: what a training step eats, and how dataset rows become one.

A `PairBatch` holds the latents of the preferred (`chosen`) and rejected clips and their
shared conditions. `collate_pairs` turns dataset rows (raw clips or cached latents) into
one, encoding on the model adapter's device; `random_pair_batch` makes one of the right
shapes for benchmarks and tests. The adapter is passed in (any `VideoModelAdapter`):
this module imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.errors import UserError

if TYPE_CHECKING:  # annotations only: data code does not import the models
    from videodpo.models.base import Conditions, VideoModelAdapter


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
