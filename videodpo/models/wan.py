"""Wan2.1 text-to-video and image-to-video over diffusers' `WanTransformer3DModel`.

Flow matching: x_t = (1 - sigma) x0 + sigma eps, the transformer sees
`timestep = 1000 sigma` and predicts v = eps - x0. Image-to-video concatenates to the
noisy latent a frame mask (one channel per frame the VAE folds into a latent frame)
and the VAE latent of the first frame followed by black frames, as
`WanImageToVideoPipeline` does; Wan2.1 I2V also cross-attends to CLIP image tokens.

Wan2.2 is this same adapter. TI2V-5B (`expand_timesteps`, the 48-channel
`AutoencoderKLWan`, 16x spatial) gives every token its own timestep: as text-to-video
they are all t; as image-to-video the first latent frame is the VAE latent of the given
image at t = 0, and the error leaves that frame out (`loss_frames`), since the model is
never asked to denoise it. A14B's two experts (`transformer_2`, `boundary_ratio`) are a
`videodpo.models.experts.TimestepExperts`, which this adapter calls like one transformer.

A trained LoRA is exported in diffusers' layout, the original Wan layout that ComfyUI
and the Wan repository load (`videodpo.models.lora_format`), or both (`lora.export_format`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from common.errors import ConfigError
from videodpo.models.base import Conditions, VideoModelAdapter
from videodpo.models.cp_plans import WAN_CP_PLAN
from videodpo.models.lora_format import check_original_wan_modules, save_original_wan_lora

ORIGINAL_LORA_FILE = "wan_lora_original.safetensors"  # beside diffusers' file in the export folder


class WanAdapter(VideoModelAdapter):
    family = "wan"
    transformer_class = WanTransformer3DModel
    pipeline_classes = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}
    cp_plan = WAN_CP_PLAN  # context parallelism, applied by common.cp_plans
    lora_export_formats = ("diffusers", "original", "both")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # TI2V-5B's per-token timesteps; with an image, its latent is the first frame at t = 0
        self.expand_timesteps = bool(self._pipeline_config().get("expand_timesteps"))
        self.image_first_frame = self.expand_timesteps and self.task == "i2v"

    def _pipeline_config(self) -> dict:
        if self.pipeline is not None:
            return dict(self.pipeline.config)
        index = None if self.model_dir is None else self.model_dir / "model_index.json"
        return json.loads(index.read_text()) if index is not None and index.is_file() else {}

    @property
    def loss_frames(self) -> slice:
        return slice(1, None) if self.image_first_frame else slice(None)

    def check_lora_export(self, export_format: str, lora_modules: list[str]) -> None:
        super().check_lora_export(export_format, lora_modules)
        if export_format != "diffusers":
            check_original_wan_modules(lora_modules)

    def save_lora(self, out_dir: str | Path, lora_state_dict: dict[str, torch.Tensor],
                  adapter_metadata: dict | None = None, export_format: str = "diffusers") -> Path:
        """`export_format` diffusers: diffusers' file; original: `ORIGINAL_LORA_FILE` (its
        scale baked in, so it needs no metadata); both: the two files in `out_dir`
        (`pipe.load_lora_weights(out_dir)` picks diffusers' one)."""
        self.check_lora_export(export_format, [])
        out_dir = Path(out_dir)
        if export_format in ("diffusers", "both"):
            super().save_lora(out_dir, lora_state_dict, adapter_metadata)
        if export_format in ("original", "both"):
            meta = adapter_metadata or {}
            rank, alpha = meta.get("r"), meta.get("lora_alpha")
            if rank is None or alpha is None or meta.get("rank_pattern") or meta.get("alpha_pattern"):
                raise ConfigError("lora.export_format: the original Wan layout needs one LoRA rank and "
                                  "alpha for all modules (adapter metadata with r and lora_alpha)")
            save_original_wan_lora(out_dir / ORIGINAL_LORA_FILE, lora_state_dict, rank, alpha)
        return out_dir

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return video.float()
        latents = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        mean, std = self._latent_stats(latents.float())
        video = self.vae.decode((latents.float() * std + mean).to(self.vae.device, self.vae.dtype)).sample
        return video.float().clamp(-1, 1)

    @torch.no_grad()
    def image_conditions(self, first_frames: torch.Tensor, num_frames: int) -> Conditions:
        if self.image_first_frame:  # TI2V: the image's own latent, one frame, no mask channels
            return {"image_latents": self.encode_video(first_frames[:, :, None])}
        b, c, h, w = first_frames.shape
        clip = torch.cat([first_frames[:, :, None], first_frames.new_zeros(b, c, num_frames - 1, h, w)], dim=2)
        latent = self.encode_video(clip)
        t = self.temporal_compression
        f = latent.shape[2]
        # One mask channel per pixel frame folded into a latent frame; the first latent
        # frame covers the first pixel frame repeated t times, as in the pipeline.
        mask = torch.zeros(b, 1, num_frames, *latent.shape[-2:], dtype=latent.dtype, device=latent.device)
        mask[:, :, 0] = 1
        if t > 1:
            mask = torch.cat([mask[:, :, :1].repeat_interleave(t, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(b, f, t, *latent.shape[-2:]).transpose(1, 2)
        cond: Conditions = {"image_latents": torch.cat([mask, latent], dim=1)}
        pipe = self.pipeline
        if pipe is not None and getattr(pipe, "image_encoder", None) is not None:
            images = [((f.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().cpu().numpy() for f in first_frames]
            cond["image_embeds"] = pipe.encode_image(images, device=self.encoder_device)
        return cond

    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditions
    ) -> torch.Tensor:
        dtype = cond["text"].dtype
        x = noisy
        if self.image_first_frame:
            x = torch.cat([cond["image_latents"].to(noisy.dtype), noisy[:, :, 1:]], dim=2)
            timesteps = self._token_timesteps(transformer, noisy.shape, timesteps)
        elif self.task == "i2v":
            x = torch.cat([noisy, cond["image_latents"].to(noisy.dtype)], dim=1)
        return transformer(
            hidden_states=x.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["text"],
            encoder_hidden_states_image=cond.get("image_embeds"),
            return_dict=False,
        )[0]

    @staticmethod
    def _token_timesteps(transformer: nn.Module, shape: torch.Size, timesteps: torch.Tensor) -> torch.Tensor:
        """(B, tokens): t for every token but those of the first latent frame, which get 0
        (the pipeline's `first_frame_mask` over the patch grid)."""
        pt, ph, pw = transformer.config.patch_size
        f, h, w = shape[2] // pt, shape[3] // ph, shape[4] // pw
        mask = torch.ones(f, h, w, device=timesteps.device)
        mask[0] = 0
        return mask.flatten()[None] * timesteps.reshape(-1, 1).float()

    @torch.no_grad()
    def sample(self, cond: Conditions, latent_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> torch.Tensor:
        latents = super().sample(cond, latent_shape, *args, **kwargs)
        if self.image_first_frame:  # the pipeline's last step: the first frame is the image's latent
            latents = torch.cat([cond["image_latents"].to(latents.dtype), latents[:, :, 1:]], dim=2)
        return latents
