"""Tiny model configurations for tests, the demo and the memory benchmark.

`CaptionEncoder` embeds a synthetic-world caption as its five slot tokens (colour,
shape, direction, speed, edge rule) with a fixed, seeded table: the tiny models see
text the way a real model sees frozen T5 features, without a text encoder.
`build_pixel_adapter` makes a randomly initialised Wan or CogVideoX transformer that
works directly on pixels (latent = pixel, 3 channels), T2V or I2V.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler

from common.errors import DataError
from videodpo.captions import CAPTION_LENGTH, CAPTION_VOCAB, tokenize_caption
from videodpo.models.base import VideoModelAdapter
from videodpo.models.cogvideox import CogVideoXAdapter
from videodpo.models.wan import WanAdapter
from videodpo.objective import DiffusionObjective


class CaptionEncoder:
    """Caption -> `(B, 5, dim)` slot embeddings; the empty prompt is all padding (zeros)."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        self.dim, self.seed = dim, seed
        table = torch.randn(len(CAPTION_VOCAB), dim, generator=torch.Generator().manual_seed(seed))
        table[CAPTION_VOCAB.index("<pad>")] = 0
        self.table = table

    def tokens(self, prompt: str) -> list[int]:
        if not prompt.strip():
            return [CAPTION_VOCAB.index("<pad>")] * CAPTION_LENGTH
        try:
            return tokenize_caption(prompt)
        except DataError as err:
            raise DataError(f"the pixel-space caption encoder reads synthetic-world captions only: {err}") from None

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.tensor([self.tokens(p) for p in prompts], dtype=torch.long)
        return self.table[ids]

    def meta(self) -> dict[str, Any]:
        return {"dim": self.dim, "seed": self.seed}


def tiny_wan_config(
    task: str = "t2v",
    latent_channels: int = 3,
    mask_channels: int = 1,
    text_dim: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    ffn_dim: int = 64,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    image_dim: int | None = None,
) -> dict[str, Any]:
    """`WanTransformer3DModel` kwargs; I2V takes latent + mask + condition channels."""
    in_channels = latent_channels if task == "t2v" else 2 * latent_channels + mask_channels
    cfg: dict[str, Any] = dict(
        patch_size=tuple(patch_size), num_attention_heads=num_heads, attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=latent_channels, text_dim=text_dim, freq_dim=32,
        ffn_dim=ffn_dim, num_layers=num_layers, rope_max_seq_len=64,
    )
    if image_dim is not None:
        cfg.update(image_dim=image_dim, added_kv_proj_dim=num_heads * head_dim)
    return cfg


def tiny_cogvideox_config(
    task: str = "t2v",
    latent_channels: int = 3,
    text_dim: int = 32,
    text_length: int = CAPTION_LENGTH,
    height: int = 16,
    width: int = 16,
    num_frames: int = 8,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    patch_size: int = 2,
    temporal_compression: int = 1,
) -> dict[str, Any]:
    """`CogVideoXTransformer3DModel` kwargs with sinusoidal positions (no rotary)."""
    return dict(
        num_attention_heads=num_heads, attention_head_dim=head_dim,
        in_channels=latent_channels if task == "t2v" else 2 * latent_channels,
        out_channels=latent_channels, time_embed_dim=32, text_embed_dim=text_dim, num_layers=num_layers,
        sample_width=width, sample_height=height, sample_frames=num_frames, patch_size=patch_size,
        temporal_compression_ratio=temporal_compression, max_text_seq_length=text_length,
    )


def build_pixel_adapter(
    family: str = "wan",
    task: str = "t2v",
    seed: int = 0,
    text_dim: int = 32,
    height: int = 16,
    width: int = 16,
    num_frames: int = 8,
    sampling_shift: float = 1.0,
    **transformer_kwargs: Any,
) -> VideoModelAdapter:
    """A randomly initialised pixel-space adapter (seeded) for the synthetic world."""
    cls = {"wan": WanAdapter, "cogvideox": CogVideoXAdapter}[family]
    torch.manual_seed(seed)
    captions = CaptionEncoder(text_dim, seed)
    if family == "wan":
        config = tiny_wan_config(task, text_dim=text_dim, **transformer_kwargs)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=sampling_shift)
        objective = DiffusionObjective("flow_matching")
    else:
        config = tiny_cogvideox_config(
            task, text_dim=text_dim, height=height, width=width, num_frames=num_frames, **transformer_kwargs
        )
        scheduler = CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing",
            rescale_betas_zero_snr=True, clip_sample=False, set_alpha_to_one=True,
        )
        objective = DiffusionObjective("v_prediction", alphas_cumprod=scheduler.alphas_cumprod.clone())
    transformer = cls.transformer_class(**config)
    meta = {"family": family, "task": task, "latent": "pixel", "caption_encoder": captions.meta()}
    return cls(transformer, scheduler, task, objective, captions, pipeline=None, pixel_meta=meta)
