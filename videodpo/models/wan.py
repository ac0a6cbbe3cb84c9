"""Wan2.1 text-to-video and image-to-video over diffusers' `WanTransformer3DModel`.

Flow matching: x_t = (1 - sigma) x0 + sigma eps, the transformer sees
`timestep = 1000 sigma` and predicts v = eps - x0. Image-to-video concatenates to the
noisy latent a frame mask (one channel per frame the VAE folds into a latent frame)
and the VAE latent of the first frame followed by black frames, as
`WanImageToVideoPipeline` does; Wan2.1 I2V also cross-attends to CLIP image tokens.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from videodpo.models.base import Conditions, VideoModelAdapter
from videodpo.models.cp_plans import WAN_CP_PLAN


class WanAdapter(VideoModelAdapter):
    family = "wan"
    transformer_class = WanTransformer3DModel
    pipeline_classes = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}
    cp_plan = WAN_CP_PLAN  # context parallelism, applied by common.cp_plans

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
        if self.task == "i2v":
            x = torch.cat([noisy, cond["image_latents"].to(noisy.dtype)], dim=1)
        return transformer(
            hidden_states=x.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["text"],
            encoder_hidden_states_image=cond.get("image_embeds"),
            return_dict=False,
        )[0]
