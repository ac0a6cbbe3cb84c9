"""CogVideoX text-to-video and image-to-video over `CogVideoXTransformer3DModel`.

DDPM-style training with the scheduler's `prediction_type` (v-prediction for the
released 2B/5B models, epsilon otherwise) and its `alphas_cumprod` (CogVideoX's
schedulers fold their SNR shift into them). The transformer wants `(B, F, C, H, W)`
and text of exactly `max_text_seq_length` tokens; image-to-video concatenates the
first frame's latent, zero-padded to the latent frame count, along channels.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from torch import nn

from videodpo.models.base import Conditions, VideoModelAdapter
from videodpo.models.cp_plans import COGVIDEOX_CP_PLAN


class CogVideoXAdapter(VideoModelAdapter):
    family = "cogvideox"
    transformer_class = CogVideoXTransformer3DModel
    pipeline_classes = {"t2v": "CogVideoXPipeline", "i2v": "CogVideoXImageToVideoPipeline"}
    cp_plan = COGVIDEOX_CP_PLAN  # context parallelism, applied by common.cp_plans

    @property
    def _scaling(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return video.float()
        return self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float() * self._scaling

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        video = self.vae.decode((latents.float() / self._scaling).to(self.vae.device, self.vae.dtype)).sample
        return video.float().clamp(-1, 1)

    @torch.no_grad()
    def image_conditions(self, first_frames: torch.Tensor, num_frames: int) -> Conditions:
        first = self.encode_video(first_frames[:, :, None])  # (B, C, 1, h, w)
        pad = first.new_zeros(first.shape[0], first.shape[1], self.latent_frames(num_frames) - 1, *first.shape[-2:])
        return {"image_latents": torch.cat([first, pad], dim=2)}

    def _rotary(self, frames: int, height: int, width: int, device: torch.device) -> Any:
        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p, p_t = cfg.patch_size, cfg.patch_size_t
        grid_h, grid_w = height // p, width // p
        base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
                temporal_size=frames, device=device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
            temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w), device=device,
        )

    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditions
    ) -> torch.Tensor:
        dtype = cond["text"].dtype
        x = noisy
        if self.task == "i2v":
            x = torch.cat([noisy, cond["image_latents"].to(noisy.dtype)], dim=1)
        b, _, f, h, w = x.shape
        cfg = self.transformer.config
        ofs = x.new_full((b,), 2.0) if cfg.ofs_embed_dim else None
        out = transformer(
            hidden_states=x.permute(0, 2, 1, 3, 4).to(dtype),
            encoder_hidden_states=cond["text"],
            timestep=timesteps.long(),
            ofs=ofs,
            image_rotary_emb=self._rotary(f, h, w, x.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    def sampling_scheduler(self) -> Any:
        # CogVideoX ships a DPM scheduler whose `step` needs extra state; DDIM over the
        # same alphas is the sampler with the plain `step(pred, t, x)` interface.
        return CogVideoXDDIMScheduler.from_config(self.scheduler.config)
