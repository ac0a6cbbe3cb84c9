"""`videodpo sample --config CFG`: clips from a trained model, as mp4s and a contact sheet.

`sample.checkpoint` may be an exported model directory (`save_pretrained`), an exported
LoRA directory (applied to `model.path`), or a training checkpoint (`.../step_N`, or
"latest" for the newest under `out_dir/checkpoints`); empty means the run's export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import diffusers
import torch

from common.checkpoint import Checkpointer
from common.config import add_config_args, config_from_args
from common.errors import ConfigError
from videodpo.config import RunConfig
from videodpo.data.video_io import load_image
from videodpo.models import VideoModelAdapter, load_adapter
from videodpo.models.experts import EXPORT_DIRS, TimestepExperts, experts_of
from videodpo.models.wan import ORIGINAL_LORA_FILE
from videodpo.state import add_lora
from videodpo.validation import generate, write_clips, write_contact_sheet

HELP = "generate clips from a trained model or checkpoint"
LORA_FILE = "pytorch_lora_weights.safetensors"


def resolve_checkpoint(cfg: RunConfig) -> Path:
    if cfg.sample.checkpoint and cfg.sample.checkpoint != "latest":
        return Path(cfg.sample.checkpoint)
    out = Path(cfg.out_dir)
    if cfg.sample.checkpoint == "latest":
        latest = Checkpointer(out / "checkpoints").latest()
        if latest is None:
            raise ConfigError(f"sample.checkpoint=latest: no checkpoint under {out / 'checkpoints'}")
        return latest
    for name in ("final", "final_lora"):
        if (out / name).is_dir():
            return out / name
    raise ConfigError(f"sample.checkpoint: empty, and {out} has no final export; name a model or checkpoint")


def load_for_sampling(cfg: RunConfig) -> VideoModelAdapter:
    """The adapter with the trained weights of `sample.checkpoint` in place."""
    path = resolve_checkpoint(cfg)
    if (path / "model_index.json").is_file() or (path / "videodpo_model.json").is_file():
        return load_adapter(path)
    if not cfg.model.path:
        raise ConfigError(f"model.path: needed to apply {path} to its base model")
    adapter = load_adapter(cfg.model.path, task=cfg.model.task)
    experts = experts_of(adapter.transformer)
    # one LoRA folder, or one a trained expert of a two-expert model (high_noise/, low_noise/)
    folders = {name: path / sub for name, sub in EXPORT_DIRS.items() if name in experts and (path / sub).is_dir()}
    loaded = [_load_lora(adapter, experts[name], folder) for name, folder in (folders or {"transformer": path}).items()]
    if loaded and all(loaded):
        return adapter
    if not path.is_dir():
        raise ConfigError(f"sample.checkpoint: {path} is not a model, LoRA or checkpoint directory")
    if isinstance(adapter.transformer, TimestepExperts):  # the checkpoint's LoRAs: its trained experts
        adapter.transformer.train_experts(cfg.train.experts)
    if cfg.lora.enabled:
        add_lora(adapter.transformer, cfg)
    Checkpointer(path.parent).load(model=adapter.transformer, which=path)
    return adapter


def _load_lora(adapter: VideoModelAdapter, transformer: torch.nn.Module, folder: Path) -> bool:
    """Apply the LoRA export in `folder` (diffusers' file, else the original Wan layout,
    which diffusers converts) to `transformer`, with its saved alpha; False when `folder`
    holds neither. Read through the pipeline's `lora_state_dict`, as
    `pipe.load_lora_weights` reads it: a path given to `load_lora_adapter` alone loses
    the adapter metadata (alpha = rank)."""
    pipeline_class = getattr(diffusers, adapter.pipeline_classes[adapter.task])
    for name in (LORA_FILE, ORIGINAL_LORA_FILE):
        if (folder / name).is_file():
            lora, metadata = pipeline_class.lora_state_dict(str(folder / name), return_lora_metadata=True)
            transformer.load_lora_adapter(lora, prefix="transformer", metadata=metadata)
            return True
    return False


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(RunConfig, args)
    s = cfg.sample
    if not s.prompts:
        raise ConfigError("sample.prompts: give at least one prompt")
    adapter = load_for_sampling(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter.transformer.to(device).eval()
    adapter.place_encoders(device, offload=cfg.model.offload_encoders)
    first = None
    if adapter.task == "i2v":
        if len(s.first_frames) != len(s.prompts):
            raise ConfigError("sample.first_frames: an I2V model needs one image per prompt")
        first = torch.stack([load_image(p, s.height, s.width) for p in s.first_frames])
    clips = generate(adapter, adapter.transformer, list(s.prompts), s.num_frames, s.height, s.width, first,
                     s.num_steps, s.guidance_scale, s.seed)
    out = Path(s.out_dir or Path(cfg.out_dir) / "samples")
    paths = write_clips(clips, out, prefix="sample")
    write_contact_sheet(clips, out / "contact_sheet.png")
    print(f"wrote {len(paths)} clips and a contact sheet to {out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
