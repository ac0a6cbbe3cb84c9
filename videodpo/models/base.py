"""The adapter interface every video model family implements, and what they share.

An adapter describes one diffusers video transformer for training: it turns prompts,
first frames and clips into conditions and latents, runs the transformer on a noisy
latent (`predict`), names the objective whose target the prediction regresses, samples
clips for validation and saves the result. It never knows about parallelism: FSDP,
context and pair parallelism wrap `adapter.transformer` from outside.

Latents are always `(B, C, F, H, W)`; families whose transformer wants another layout
permute inside `predict`. Conditions are a dict of tensors: `text` `(B, L, D)`, and for
image-to-video `image_latents` (what is concatenated to the noisy latent) and
optionally `image_embeds` (an image encoder's tokens). A latent cache can store them.

Two kinds of model directory load: a diffusers pipeline directory (`model_index.json`:
VAE, text encoder, scheduler, transformer) and a pixel-space model of the synthetic
world (`videodpo_model.json`: transformer and scheduler only, latent = pixel, captions
embedded by `CaptionEncoder`).

Encoders live where the run computes: `place_encoders(device, offload)` names the
device, and code that encodes or decodes does it inside `with adapter.encoders_on_device():`,
which moves the VAE, text and image encoders there (and back to the CPU afterwards when
`offload` is set). An adapter loaded without its encoders (`model_dir` set, `pipeline`
None: training from a latent cache) loads them the first time something encodes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
from torch import nn

from common.errors import ConfigError
from videodpo.models.experts import experts_of
from videodpo.objective import DiffusionObjective, per_sample_error

Conditions = dict[str, torch.Tensor]
PIXEL_MODEL_FILE = "videodpo_model.json"
TASKS = ("t2v", "i2v")


class VideoModelAdapter(ABC):
    """One model family's view of a diffusers transformer plus its encoders."""

    family: ClassVar[str]
    transformer_class: ClassVar[type[nn.Module]]
    # task -> diffusers pipeline class name, imported when used (importing the I2V
    # pipelines prints a notice about torchvision)
    pipeline_classes: ClassVar[dict[str, str]]

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        task: str,
        objective: DiffusionObjective,
        prompt_encoder: Callable[[list[str]], torch.Tensor] | None = None,
        pipeline: Any = None,
        pixel_meta: dict | None = None,
        model_dir: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.transformer = transformer
        self.scheduler = scheduler
        self.task = task
        self.objective = objective
        self.prompt_encoder = prompt_encoder  # None: the pipeline's `encode_prompt`
        self.pipeline = pipeline  # diffusers pipeline holding VAE / encoders; None in pixel space
        self.pixel_meta = pixel_meta
        # the pipeline folder this adapter came from: encoders load from it when first needed
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.dtype = dtype
        self.encoder_device = torch.device("cpu")
        self.offload_encoders = False

    # ---- encoders: what is loaded, and where it runs ----------------------------------

    def place_encoders(self, device: torch.device | str, offload: bool = False) -> None:
        """Encode on `device`; with `offload`, keep the encoders on the CPU between uses."""
        self.encoder_device, self.offload_encoders = torch.device(device), offload
        if not offload and self.pipeline is not None:
            self._move_encoders(self.encoder_device)

    @property
    def encoders_loaded(self) -> bool:
        return self.pipeline is not None

    def encoder_pipeline(self) -> Any:
        """The diffusers pipeline with VAE and encoders, loaded from `model_dir` on first
        use (in the adapter's dtype, without a second transformer); None in pixel space."""
        if self.pipeline is None and self.model_dir is not None:
            self.pipeline = load_encoder_pipeline(self.model_dir, self.dtype)
            if not self.offload_encoders:
                self._move_encoders(self.encoder_device)
        return self.pipeline

    def _move_encoders(self, device: torch.device) -> None:
        for name in ("vae", "text_encoder", "image_encoder"):
            module = getattr(self.pipeline, name, None)
            if module is not None:
                module.to(device)

    @contextlib.contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """VAE, text and image encoders on `encoder_device` inside; back on the CPU after
        when `offload_encoders` is set."""
        if self.encoder_pipeline() is None:
            yield
            return
        self._move_encoders(self.encoder_device)
        try:
            yield
        finally:
            if self.offload_encoders:
                self._move_encoders(torch.device("cpu"))

    # ---- conditions and latents -------------------------------------------------------

    @property
    def pixel_space(self) -> bool:
        return self.pipeline is None and self.model_dir is None

    @property
    def vae(self) -> Any:
        pipe = self.encoder_pipeline()
        return None if pipe is None else pipe.vae

    @property
    def temporal_compression(self) -> int:
        return 1 if self.vae is None else int(self.pipeline.vae_scale_factor_temporal)

    def prompt_length(self) -> int:
        """Text tokens per prompt: CogVideoX's fixed `max_text_seq_length`, else 512 (Wan)."""
        return int(getattr(self.transformer.config, "max_text_seq_length", None) or 512)

    def latent_frames(self, num_frames: int) -> int:
        t = self.temporal_compression
        return num_frames if t == 1 else (num_frames - 1) // t + 1

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if self.prompt_encoder is not None:
            return self.prompt_encoder(list(prompts))
        return self.encoder_pipeline().encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.prompt_length(),
            device=self.encoder_device,
        )[0]

    @abstractmethod
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Clips `(B, 3, F, H, W)` in [-1, 1] -> normalised latents `(B, C, f, h, w)`."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> clips `(B, 3, F, H, W)` in [-1, 1]."""

    @abstractmethod
    def image_conditions(self, first_frames: torch.Tensor, num_frames: int) -> Conditions:
        """First frames `(B, 3, H, W)` in [-1, 1] -> `image_latents` (and `image_embeds`)."""

    @torch.no_grad()
    def prepare_conditions(
        self, prompts: list[str], first_frames: torch.Tensor | None = None, num_frames: int | None = None
    ) -> Conditions:
        cond: Conditions = {"text": self.encode_prompts(prompts)}
        if self.task == "i2v":
            if first_frames is None or num_frames is None:
                raise ValueError("image-to-video conditions need first frames and the frame count")
            cond.update(self.image_conditions(first_frames, num_frames))
        return cond

    # ---- the model --------------------------------------------------------------------

    @abstractmethod
    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditions
    ) -> torch.Tensor:
        """The transformer's output for noisy latents `(B, C, f, h, w)`, same layout."""

    loss_frames: slice = slice(None)  # latent frames the error covers (Wan2.2 TI2V: not the image's)

    def training_error(
        self, model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: Conditions
    ) -> torch.Tensor:
        """Per-sample error e `(B,)` of `model` on clean latents `x0` noised with `noise` to
        `timesteps`: the objective's target against the prediction, over `loss_frames`."""
        noisy = self.objective.add_noise(x0, noise, timesteps)
        target = self.objective.target(x0, noise, timesteps)
        prediction = self.predict(model, noisy, timesteps, cond)
        frames = self.loss_frames
        return per_sample_error(prediction[:, :, frames], target[:, :, frames])

    def sampling_scheduler(self) -> Any:
        return copy.deepcopy(self.scheduler)

    @torch.no_grad()
    def sample(
        self,
        cond: Conditions,
        latent_shape: tuple[int, ...],
        num_steps: int = 20,
        generator: torch.Generator | None = None,
        transformer: nn.Module | None = None,
        guidance_scale: float = 1.0,
        negative_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents from noise with the family's scheduler (`step` API) and optional CFG."""
        transformer = self.transformer if transformer is None else transformer
        sched = self.sampling_scheduler()
        sched.set_timesteps(num_steps)
        latents = torch.randn(latent_shape, generator=generator) * float(getattr(sched, "init_noise_sigma", 1.0))
        latents = latents.to(cond["text"].device)
        for t in sched.timesteps:
            timesteps = t.expand(latent_shape[0]).to(latents.device)
            model_in = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
            pred = self.predict(transformer, model_in, timesteps, cond).float()
            if guidance_scale != 1.0 and negative_text is not None:
                uncond = dict(cond, text=negative_text.expand_as(cond["text"]))
                pred_u = self.predict(transformer, model_in, timesteps, uncond).float()
                pred = pred_u + guidance_scale * (pred - pred_u)
            latents = sched.step(pred, t, latents, return_dict=False)[0]
        return latents

    # ---- saving -----------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path, transformer: nn.Module | None = None) -> Path:
        """A loadable model directory with `transformer` (default: the adapter's) in it."""
        out_dir = Path(out_dir)
        transformer = self.transformer if transformer is None else transformer
        if self.pixel_space:
            transformer.save_pretrained(out_dir / "transformer")
            self.scheduler.save_pretrained(out_dir / "scheduler")
            (out_dir / PIXEL_MODEL_FILE).write_text(json.dumps(self.pixel_meta, indent=2))
        elif self.pipeline is None:  # encoders never loaded: copy their files, new transformer(s)
            out_dir.mkdir(parents=True, exist_ok=True)
            parts = experts_of(transformer)
            for entry in self.model_dir.iterdir():
                if entry.name in parts:
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, out_dir / entry.name, dirs_exist_ok=True)
                else:
                    shutil.copy2(entry, out_dir / entry.name)
            for name, part in parts.items():
                part.save_pretrained(out_dir / name)
        else:
            pipe = copy.copy(self.pipeline)
            pipe.register_modules(**experts_of(transformer))
            pipe.save_pretrained(out_dir)
        return out_dir

    lora_export_formats: tuple[str, ...] = ("diffusers",)  # `lora.export_format` values

    def check_lora_export(self, export_format: str, lora_modules: list[str]) -> None:
        """Refuse (ConfigError) an export layout this family cannot write for these LoRA
        target modules (transformer-relative names), before training starts."""
        if export_format not in self.lora_export_formats:
            raise ConfigError(f"lora.export_format: {export_format!r} is not written for {self.family} "
                              f"models; use one of {list(self.lora_export_formats)}")

    def save_lora(self, out_dir: str | Path, lora_state_dict: dict[str, torch.Tensor],
                  adapter_metadata: dict | None = None, export_format: str = "diffusers") -> Path:
        """LoRA weights in diffusers format, loadable with `pipe.load_lora_weights(out_dir)`.
        `adapter_metadata` is the peft `LoraConfig.to_dict()`: without it a loader cannot
        know `lora_alpha` and applies the wrong scale when alpha != rank."""
        self.check_lora_export(export_format, [])
        out_dir = Path(out_dir)
        getattr(diffusers, self.pipeline_classes[self.task]).save_lora_weights(
            out_dir, transformer_lora_layers=lora_state_dict, transformer_lora_adapter_metadata=adapter_metadata)
        return out_dir


def load_encoder_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The diffusers pipeline of `path` with VAE, text and image encoders, scheduler and
    tokenizer, and no transformer (`transformer=None`: nothing of it is read)."""
    index = Path(path) / "model_index.json"
    class_name = json.loads(index.read_text()).get("_class_name")
    extra = {"transformer_2": None} if "transformer_2" in json.loads(index.read_text()) else {}
    pipe = getattr(diffusers, class_name).from_pretrained(path, transformer=None, dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_pixel_meta(path: str | Path) -> dict | None:
    file = Path(path) / PIXEL_MODEL_FILE
    return json.loads(file.read_text()) if file.is_file() else None
