"""Validation during and after training: pair metrics, sample clips, contact sheets.

`pair_metrics` scores a model on held-out pairs at fixed timesteps and noise (so two
models are compared on the same draws): DPO accuracy (share of pairs where the policy
moved towards the preferred clip more than the reference did), margin, and the mean
error on preferred and rejected clips. `generate` samples clips; `write_contact_sheet`
lays clips out as rows of frames in one PNG; `Validator` does all of it every N steps.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from videodpo.config import RunConfig
from videodpo.data.dataset import PairDataset
from videodpo.data.motion import motion_fidelity
from videodpo.data.pairs import collate_pairs
from videodpo.data.video_io import load_image, write_video
from videodpo.losses import dpo_accuracy_and_margin, preference_gap
from videodpo.models import VideoModelAdapter
from videodpo.models.base import Conditions

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_errors(
    adapter: VideoModelAdapter, model: nn.Module, latents: torch.Tensor, cond: Conditions,
    num_timesteps: int = 4, seed: int = 0, batch_size: int = 16,
    timestep_range: tuple[float, float | None] = (0.0, None),
) -> torch.Tensor:
    """Per-sample error averaged over `num_timesteps` evenly spaced timesteps within
    `timestep_range` (default: all; a run training one expert scores its range), with
    noise fixed by `seed` (the same draws for every model); shape (N,)."""
    obj = adapter.objective
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    low, high = timestep_range
    high = obj.num_train_timesteps if high is None else high
    levels = [(i + 0.5) / num_timesteps for i in range(num_timesteps)]
    total = torch.zeros(latents.shape[0])
    for level in levels:
        for start in range(0, latents.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            x = latents[sl]
            eps = noise[sl].to(x.device)
            t = torch.full((x.shape[0],), low + level * (high - low), device=x.device)
            if obj.kind != "flow_matching":
                t = t.floor()
            total[sl] += adapter.training_error(model, x, eps, t, {k: v[sl] for k, v in cond.items()}).cpu()
    return total / num_timesteps


@torch.no_grad()
def pair_metrics(
    adapter: VideoModelAdapter, policy: nn.Module, reference: nn.Module, chosen: torch.Tensor,
    rejected: torch.Tensor, cond: Conditions, num_timesteps: int = 4, seed: int = 0,
) -> dict[str, float]:
    """DPO accuracy, margin and errors of `policy` against `reference` on pairs."""
    pw = sample_errors(adapter, policy, chosen, cond, num_timesteps, seed)
    pl = sample_errors(adapter, policy, rejected, cond, num_timesteps, seed)
    rw = sample_errors(adapter, reference, chosen, cond, num_timesteps, seed)
    rl = sample_errors(adapter, reference, rejected, cond, num_timesteps, seed)
    accuracy, margin = dpo_accuracy_and_margin(preference_gap(pw, pl, rw, rl))
    return {
        "dpo_accuracy": accuracy,
        "margin": margin,
        "chosen_error": pw.mean().item(),
        "rejected_error": pl.mean().item(),
    }


@torch.no_grad()
def generate(
    adapter: VideoModelAdapter, model: nn.Module, prompts: list[str], num_frames: int, height: int,
    width: int, first_frames: torch.Tensor | None = None, num_steps: int = 20, guidance_scale: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Clips `(N, 3, F, H, W)` in [-1, 1] for prompts (and first frames, I2V). Encoding,
    sampling and decoding run on the adapter's encoder device (the run's device)."""
    device = adapter.encoder_device
    with adapter.encoders_on_device():
        if first_frames is not None:
            first_frames = first_frames.to(device)
        cond = {k: v.to(device) for k, v in adapter.prepare_conditions(prompts, first_frames, num_frames).items()}
        negative = adapter.encode_prompts([""]).to(device) if guidance_scale != 1.0 else None
        scale = 1 if adapter.pixel_space else int(adapter.pipeline.vae_scale_factor_spatial)
    channels = adapter.transformer.config.out_channels or adapter.transformer.config.in_channels
    shape = (len(prompts), channels, adapter.latent_frames(num_frames), height // scale, width // scale)
    latents = adapter.sample(cond, shape, num_steps, torch.Generator().manual_seed(seed), model,
                             guidance_scale, negative)
    with adapter.encoders_on_device():
        return adapter.decode_latents(latents).cpu()


def write_contact_sheet(clips: torch.Tensor, path: str | Path, labels: list[str] | None = None,
                        scale: int = 4) -> Path:
    """One PNG: a row per clip `(N, 3, F, H, W)` in [-1, 1], its frames left to right."""
    n, _, f, h, w = clips.shape
    gap, label_w = 2, 0 if not labels else 8 * max(len(s) for s in labels) // 1 + 6
    tile_h, tile_w = h * scale, w * scale
    sheet = Image.new("RGB", (label_w + f * (tile_w + gap), n * (tile_h + gap)), (40, 40, 40))
    pixels = ((clips.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        if labels:
            draw.text((2, i * (tile_h + gap) + tile_h // 2 - 5), labels[i], fill=(230, 230, 230))
        for j in range(f):
            frame = Image.fromarray(pixels[i, :, j].permute(1, 2, 0).numpy()).resize((tile_w, tile_h), Image.NEAREST)
            sheet.paste(frame, (label_w + j * (tile_w + gap), i * (tile_h + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_clips(clips: torch.Tensor, out_dir: str | Path, fps: float = 8.0, prefix: str = "clip") -> list[Path]:
    out_dir = Path(out_dir)
    return [write_video(out_dir / f"{prefix}_{i:03d}.mp4", clip, fps=fps) for i, clip in enumerate(clips)]


def motion_scores(clips: torch.Tensor, records: list[Any]) -> float:
    """Mean motion fidelity of clips against their synthetic-world records."""
    return sum(motion_fidelity(c, r) for c, r in zip(clips, records)) / max(1, len(records))


class Validator:
    """Every `validation.every` steps: clips for the validation prompts (mp4 + contact
    sheet) and, with `validation.manifest`, pair metrics on held-out pairs."""

    def __init__(self, cfg: RunConfig, adapter: VideoModelAdapter) -> None:
        self.cfg, self.adapter = cfg, adapter
        self.pairs = None
        if cfg.validation.manifest:
            data = PairDataset(cfg.validation.manifest, num_frames=cfg.data.num_frames or None,
                               height=cfg.data.height or None, width=cfg.data.width or None,
                               with_first_frame=adapter.task == "i2v")
            items = [data[i] for i in range(min(len(data), cfg.validation.max_pairs))]
            self.pairs = collate_pairs(adapter, items)

    def __call__(self, state: Any) -> dict[str, float]:
        cfg, v = self.cfg, self.cfg.validation
        metrics: dict[str, float] = {}
        # Every rank runs the model (FSDP and cp need all of them); rank 0 writes.
        out = Path(cfg.out_dir) / "validation" / f"step_{state.step:07d}"
        if self.pairs is not None:
            state.policy.eval()
            errors = functools.partial(sample_errors, self.adapter, timestep_range=state.timestep_range)
            pw = errors(state.policy, self.pairs.chosen, self.pairs.cond)
            pl = errors(state.policy, self.pairs.rejected, self.pairs.cond)
            metrics.update(sft_error=pw.mean().item(), rejected_error=pl.mean().item())
            if state.reference is not None or state.lora:  # SFT of a full model keeps no reference
                with state.reference_context():
                    ref = state.reference if state.reference is not None else state.policy
                    rw = errors(ref, self.pairs.chosen, self.pairs.cond)
                    rl = errors(ref, self.pairs.rejected, self.pairs.cond)
                accuracy, margin = dpo_accuracy_and_margin(preference_gap(pw, pl, rw, rl))
                metrics.update(dpo_accuracy=accuracy, margin=margin)
            state.policy.train()
        if v.prompts:
            first = None
            if self.adapter.task == "i2v" and v.first_frames:
                first = torch.stack([load_image(p, v.height, v.width) for p in v.first_frames])
            state.policy.eval()
            clips = generate(self.adapter, state.policy, list(v.prompts), v.num_frames, v.height, v.width,
                             first, v.num_steps, v.guidance_scale, v.seed)
            state.policy.train()
            if state.layout.is_main:
                write_clips(clips, out)
                write_contact_sheet(clips, out / "contact_sheet.png")
        return metrics
