"""Training and sampling configuration of videodpo, one dataclass per concern.

`RunConfig` is what `videodpo train --config CFG` and `videodpo sample --config CFG`
read (through `common.config.load_config`); `BuildPairsConfig` and `PrecomputeConfig`
are the data jobs' (`videodpo build-pairs`, `videodpo precompute`). Every default lives
here and only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.regularizer import RegularizerConfig
from videodpo.losses import LossKind

MAX_BAD_ROW_FRACTION = 0.1  # the default share of corrupt rows a dataset may skip


@dataclass
class ModelConfig:
    path: str = ""  # local diffusers pipeline dir, or a pixel-space model dir
    dtype: str = "float32"  # weights as loaded; bf16 for real runs
    flow_shift: float = 1.0  # time shift of the training sigmas (flow matching)
    offload_encoders: bool = False  # VAE / text / image encoders on the CPU between uses
    task: Literal["", "t2v", "i2v"] = ""  # "": the pipeline's; i2v trains Wan2.2 TI2V-5B (saved as WanPipeline) on first frames


@dataclass
class DataConfig:
    LIMITS = {"num_frames": ">=0", "height": ">=0", "width": ">=0", "max_bad_row_fraction": "[0,1]",
              "num_workers": ">=0", "prefetch_factor": ">=1"}
    manifest: str = ""  # GT-Pair manifest (JSONL/CSV) with chosen / rejected clips
    latent_cache: str = ""  # or a latent cache made by `videodpo precompute`
    num_frames: int = 0  # 0: as stored
    height: int = 0
    width: int = 0
    max_bad_row_fraction: float = MAX_BAD_ROW_FRACTION  # corrupt rows are skipped and counted up to this share
    num_workers: int = 2  # DataLoader worker processes that decode and resize ahead of the step
    prefetch_factor: int = 2  # rows each worker reads ahead


@dataclass
class LossConfig:
    LIMITS = {"beta": ">0", "sft_weight": ">=0"}
    kind: LossKind = "reg_dpo"
    beta: float = 500.0
    sft_weight: float = 1.0  # lambda of Reg-DPO


@dataclass
class LoraConfig:
    LIMITS = {"rank": ">=1", "alpha": ">0", "dropout": "[0,1)"}
    enabled: bool = False
    rank: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    export_format: Literal["diffusers", "original", "both"] = "diffusers"  # original: the Wan layout (ComfyUI)


@dataclass
class OptimConfig:
    LIMITS = {"lr": ">0", "weight_decay": ">=0", "beta1": "[0,1)", "beta2": "[0,1)", "eps": ">0",
              "warmup_steps": ">=0", "min_lr_ratio": "[0,1]", "grad_clip": ">=0"}
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # 0: off


@dataclass
class TrainConfig:
    LIMITS = {"steps": ">=1", "batch_size": ">=1", "grad_accum": ">=1", "log_every": ">=1",
              "checkpoint_every": ">=0", "max_nonfinite": ">=0"}
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # pairs per data-parallel rank per micro-step
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16: autocast where the device supports it
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    max_nonfinite: int = 10  # non-finite losses skipped before the run aborts
    experts: Literal["both", "high", "low"] = "both"  # two-expert models (Wan2.2 A14B): which trains


@dataclass
class ParallelConfig:
    LIMITS = {"dp_shard": ">=-1", "cp": ">=1", "pair": "[1,2]", "activation_checkpointing": ">=0"}
    dp_shard: int = -1  # FSDP degree; -1: what pair and cp leave
    cp: int = 1
    cp_mode: Literal["ulysses", "ring"] = "ulysses"
    pair: int = 1  # 2: preferred and rejected sample on two ranks
    fsdp: bool = True  # shard with FSDP2 when there is more than one rank
    param_dtype: str = ""  # FSDP mixed precision, e.g. bfloat16; "" keeps the weights' dtype
    activation_checkpointing: int = 0  # every n-th block; 0: off
    reference_cpu_offload: bool = False


@dataclass
class ValidationConfig:
    LIMITS = {"every": ">=0", "num_frames": ">=1", "height": ">=1", "width": ">=1",
              "num_steps": ">=1", "max_pairs": ">=0"}
    every: int = 0  # steps between validations; 0: off
    prompts: list[str] = field(default_factory=list)
    first_frames: list[str] = field(default_factory=list)  # images or clips, I2V
    num_frames: int = 8
    height: int = 16
    width: int = 16
    num_steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 0
    manifest: str = ""  # held-out pairs: DPO accuracy, margin, SFT error
    max_pairs: int = 32


@dataclass
class SampleConfig:
    LIMITS = {"num_frames": ">=1", "height": ">=1", "width": ">=1", "num_steps": ">=1"}
    checkpoint: str = ""  # model dir, LoRA dir or training checkpoint; "" = out_dir/final
    prompts: list[str] = field(default_factory=list)
    first_frames: list[str] = field(default_factory=list)
    num_frames: int = 8
    height: int = 16
    width: int = 16
    num_steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 0
    out_dir: str = ""  # "" = out_dir/samples


def _video_projector() -> RegularizerConfig:
    # measured default for video models (videodpo.regularized_step): ghost, layer-wise,
    # per-sample gradients formed per layer where cheaper than token x token products
    return RegularizerConfig(feasible="subset", granularity="layer", fraction=0.5, n_general=4,
                             path="ghost", ghost_pairs="auto")


@dataclass
class RegularizerSection:
    """General clips (no pairs) beside the pairs; see `videodpo.regularized_step`."""

    LIMITS = {"mix_weight": ">=0"}
    mode: Literal["off", "mix", "projector"] = "off"
    general_manifest: str = ""  # clip manifest: `video` + `caption` rows
    general_cache: str = ""  # or a latent cache whose `chosen` latents are the clips
    mix_weight: float = 1.0  # mix: weight of the general clips' mean SFT error
    projector: RegularizerConfig = field(default_factory=_video_projector)  # n_general: clips/step


@dataclass
class RunConfig:
    out_dir: str = "runs/videodpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    regularizer: RegularizerSection = field(default_factory=RegularizerSection)


# ---- the data jobs: `videodpo build-pairs` and `videodpo precompute` ----------------


@dataclass
class BuildPairsConfig:
    manifest: str = ""  # clip manifest: video, caption, optional image
    model: str = ""  # local diffusers pipeline directory (model_index.json)
    out_dir: str = "runs/pairs"
    task: Literal["auto", "t2v", "i2v"] = "auto"  # auto: from the pipeline class; i2v on a Wan2.2 TI2V folder conditions on first frames
    num_frames: int | None = None  # None: each clip's own frame count
    height: int | None = None  # None: each clip's own size
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    seed: int = 0  # row r is generated with seed + r
    max_sequence_length: int = 512
    dtype: str = "float32"
    offload_encoders: bool = False  # GPU: each pipeline part on the GPU only while it runs
    limit: int | None = None  # only the first rows, for a quick look


@dataclass
class PrecomputeConfig:
    manifest: str = ""  # pair manifest: chosen, rejected, caption, optional image
    model: str = ""  # local model directory (diffusers pipeline or pixel-space model)
    out_dir: str = "runs/latents"
    num_frames: int | None = None  # None: the clips' own frame count
    height: int | None = None  # None: the clips' own size
    width: int | None = None
    rows_per_shard: int = 64
    dtype: str = "float32"  # model dtype while encoding
    offload_encoders: bool = False  # keep the encoders on the CPU between rows (on a GPU machine)
    cache_dtype: str = "float32"  # dtype of the stored tensors
