"""Analytic per-rank memory of one Reg-DPO training step of a Wan transformer.

Given a model's dimensions (layers, hidden size, heads, FFN width, patch, channels,
text length), a parallel layout (FSDP degree, activation checkpointing, context
parallelism, pair parallelism) and a precision, `estimate_peak` predicts the peak
tensor memory of one rank: model state (sharded parameters, gradients, AdamW moments,
the frozen reference), FSDP's unsharded working set, and activations. No tensors are
made; `tools/memory_bench.py` checks the prediction against measured steps of a tiny
model and prints it for the real Wan2.1 models.

Activation counts come from reading diffusers' `WanTransformerBlock` (0.42): per video
token a block keeps 22 hidden-size vectors for backward (norm inputs and outputs,
q/k/v before and after norm and rotary, attention outputs and their flattened copies,
the FFN input and output), two FFN-width vectors (GELU input and output), nine
normalisation statistics and one log-sum-exp per head per attention. Six of the 22
hidden-size vectors are fp32 whatever the model dtype (Wan upcasts around its
`FP32LayerNorm`s and gates). `tests/test_memory_estimator.py` checks these counts
against `torch.autograd.graph.saved_tensors_hooks` on tiny models (exact to the byte).

The working-set terms on top (what the step holds besides saved activations: the
reference forward, the end of the forward, one recomputed block, context-parallel
buffers) are read off the code of `videodpo.trainer` and `common.context_parallel` and
checked against the measured tiny runs, not fitted. Ring attention runs its blocks on
fused kernels that return the log-sum-exp, so it keeps what Ulysses keeps (measured:
within 2% of Ulysses' peak at the same frames) and has no term of its own.

Gradients do not coexist with all activations: the peak is the largest of three phases
on top of the resident state (parameters, AdamW moments, reference): the forwards
(activations plus the forward working set, no gradients yet), the start of backward
(activations, one recomputed block with AC, and the first block's gradient), and the
optimizer step (all gradients, activations gone). At tiny width gradients are
negligible; at real width (tools/scale_bench.py, Wan2.1-T2V-1.3B blocks) counting all
gradients on top of all activations overestimated the measured peak by 14%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

FP32 = 4
BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

# Per video token, per block, kept for backward (see the module docstring).
BLOCK_HIDDEN_COMPUTE = 16  # hidden-size vectors in the compute dtype
BLOCK_HIDDEN_FP32 = 6  # hidden-size vectors Wan keeps in fp32
BLOCK_FFN = 2  # FFN-width vectors (GELU input, GELU output)
BLOCK_STATS = 9  # LayerNorm mean + rstd (x3), RMSNorm rstd (q, k of self-attn, q of cross)
ATTENTIONS_PER_BLOCK = 2  # self and text cross-attention, one log-sum-exp per head each
I2V_BLOCK_HIDDEN = 2  # I2V: the image cross-attention's output and its flattened copy
# Per video token, outside the blocks: patch-embedding output, norm_out input and output
# (hidden size), rotary cos/sin tables (head_dim each, fp32), the patchified latent input,
# and norm_out's two statistics.
OUTER_HIDDEN = 3
OUTER_STATS = 2
# The Reg-DPO step around the model (videodpo.trainer: policy forward, then the frozen
# reference's forward under no_grad while the policy's activations are kept, then
# backward), per video token, in fp32 latent units (output channels x patch):
# through backward only the saved prediction error outlives the step's locals (the
# noisy input is the patch embedding's saved input, counted with the model); during the
# forwards the pair's clean latents, their concatenation, the noise and the target live.
BACKWARD_LATENT = 1
FORWARD_LATENT = 4
# Without checkpointing the policy forward ends with everything saved plus the
# prediction and its squared error (latent units) and the head's hidden-size
# temporaries (norm_out output, modulated output, proj_out input). In backward, each
# gradient buffer appears as saved tensors of the same block are released, so the
# backward working set does not raise the peak (measured: < 2% of it).
END_OF_FORWARD_LATENT = 2
END_OF_FORWARD_HIDDEN = 3
# The reference's forward under no_grad: a few live hidden-size vectors and the FFN's
# intermediate at once, on top of what the policy keeps.
REFERENCE_HIDDEN = 6
REFERENCE_FFN = 2
# With checkpointing the peak is either that reference forward or, in backward, the
# block inputs plus one block whose forward has just been recomputed.
# Context parallelism (common.cp_plans on Wan), per token of the rank's shard: one more
# hidden-size vector kept per block, all-to-all or ring buffers in flight (hidden-size
# units) and the gathered prediction (a whole-video latent); the same for Ulysses and
# for ring attention on fused blocks.
CP_BLOCK_HIDDEN = 1
CP_TRANSIENT_HIDDEN = 4
CP_GATHERED_LATENT = 1


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs to know about a `WanTransformer3DModel`."""

    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    image_dim: int | None = None  # I2V: CLIP image-embedding width
    image_len: int = 0  # I2V: image-context tokens (257 for Wan2.1 I2V)
    vae_spatial: int = 8  # the VAE's spatial factor (Wan2.2 TI2V-5B's 48-channel VAE: 16)

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_i2v(self) -> bool:
        return self.image_dim is not None

    @classmethod
    def from_wan_config(cls, config: dict[str, Any], text_len: int = 512, image_len: int = 257) -> ModelDims:
        """From `WanTransformer3DModel.config` (or the kwargs that build one)."""
        image_dim = config.get("image_dim")
        return cls(
            num_layers=config["num_layers"],
            num_heads=config["num_attention_heads"],
            head_dim=config["attention_head_dim"],
            ffn_dim=config["ffn_dim"],
            in_channels=config["in_channels"],
            out_channels=config.get("out_channels") or config["in_channels"],
            patch_size=tuple(config["patch_size"]),
            text_dim=config["text_dim"],
            text_len=text_len,
            freq_dim=config["freq_dim"],
            image_dim=image_dim,
            image_len=image_len if image_dim is not None else 0,
        )


# The two released Wan2.1 transformers (diffusers configs of Wan-AI/Wan2.1-*-Diffusers).
WAN21_T2V_1_3B = ModelDims(num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960, freq_dim=256)
WAN21_I2V_14B = ModelDims(
    num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, in_channels=36, image_dim=1280, image_len=257
)
# Wan2.2 (Wan-AI/Wan2.2-*-Diffusers): TI2V-5B, one transformer on the 48-channel VAE (16x
# in space); T2V-A14B, two experts of this size (transformer / transformer_2), one trained
# per step on the t it draws, so a rank holds one expert's state (training both: twice it).
WAN22_TI2V_5B = ModelDims(num_layers=30, num_heads=24, head_dim=128, ffn_dim=14336, in_channels=48,
                          out_channels=48, vae_spatial=16)
WAN22_T2V_A14B_EXPERT = ModelDims(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824)
# Latent size per resolution: Wan's VAE downsamples 8x in space and 4x in time.
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
VAE_SPATIAL = 8
VAE_TEMPORAL = 4


@dataclass(frozen=True)
class Layout:
    """How one training step is split over the ranks of a run.

    FSDP shards over `fsdp_shards` ranks (all by default). `pair=2` puts the preferred and the rejected
    video of a pair on two ranks; `cp` splits each video's tokens over that many ranks
    (`cp_mode` ulysses or ring); `ac` recomputes every block in backward.
    """

    name: str
    ac: bool = False
    cp: int = 1
    cp_mode: str = "ulysses"
    pair: int = 1
    fsdp_shards: int = 0  # ranks the parameters are sharded over; 0: all of them

    @property
    def videos_per_rank(self) -> int:
        return 2 // self.pair

    def ranks_needed(self) -> int:
        return self.cp * self.pair


@dataclass(frozen=True)
class Precision:
    """Compute dtype of activations and of the unsharded parameters; state stays fp32."""

    compute: str = "fp32"
    reference: str = "fp32"  # dtype the frozen reference is stored in

    @property
    def compute_bytes(self) -> int:
        return BYTES[self.compute]

    @property
    def reference_bytes(self) -> int:
        return BYTES[self.reference]


def latent_frames(video_frames: int) -> int:
    """Wan's VAE keeps the first frame and packs every 4 after it into one latent frame."""
    return (video_frames - 1) // VAE_TEMPORAL + 1


def video_frames(latent: int) -> int:
    return (latent - 1) * VAE_TEMPORAL + 1


def tokens_per_frame(dims: ModelDims, latent_h: int, latent_w: int) -> int:
    _, ph, pw = dims.patch_size
    return (latent_h // ph) * (latent_w // pw)


def block_params(dims: ModelDims) -> int:
    d, f = dims.hidden, dims.ffn_dim
    attn1 = 4 * (d * d + d) + 2 * d  # q, k, v, out + RMSNorm q/k weights
    attn2 = 4 * (d * d + d) + 2 * d
    if dims.is_i2v:
        attn2 += 2 * (d * d + d) + d  # add_k_proj, add_v_proj, norm_added_k
    ffn = d * f + f + f * d + d
    norm2 = 2 * d  # cross_attn_norm with affine weight and bias
    return attn1 + attn2 + ffn + norm2 + 6 * d


def root_params(dims: ModelDims) -> int:
    """Parameters outside the blocks: patch embedding, condition embedders, head."""
    d = dims.hidden
    pt, ph, pw = dims.patch_size
    patch = dims.in_channels * pt * ph * pw * d + d
    time = dims.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
    text = dims.text_dim * d + d + d * d + d
    image = 0
    if dims.is_i2v:
        i = dims.image_dim  # LayerNorm, Linear(i, i), GELU, Linear(i, d), LayerNorm
        image = 2 * i + i * i + i + i * d + d + 2 * d
    head = d * dims.out_channels * pt * ph * pw + dims.out_channels * pt * ph * pw + 2 * d
    return patch + time + text + image + head


def param_count(dims: ModelDims) -> int:
    return dims.num_layers * block_params(dims) + root_params(dims)


def block_saved_bytes_per_token(dims: ModelDims, precision: Precision) -> float:
    """Bytes one block keeps for backward per video token (no checkpointing)."""
    cb = precision.compute_bytes
    d, f = dims.hidden, dims.ffn_dim
    attentions = ATTENTIONS_PER_BLOCK + (1 if dims.is_i2v else 0)
    hidden_compute = BLOCK_HIDDEN_COMPUTE + (I2V_BLOCK_HIDDEN if dims.is_i2v else 0)
    return (
        hidden_compute * d * cb
        + BLOCK_HIDDEN_FP32 * d * FP32
        + BLOCK_FFN * f * cb
        + (BLOCK_STATS + attentions * dims.num_heads) * FP32
    )


def outer_local_bytes_per_token(dims: ModelDims, precision: Precision) -> float:
    """Kept per token of the rank's sequence shard outside the blocks: the head's hidden
    states, the rotary tables and norm_out's statistics."""
    return OUTER_HIDDEN * dims.hidden * precision.compute_bytes + 2 * dims.head_dim * FP32 + OUTER_STATS * FP32


def outer_global_bytes_per_token(dims: ModelDims, precision: Precision) -> float:
    """Kept per token of the whole video on every rank: the patch embedding's input (the
    noisy latent; context parallelism splits the sequence after the embedding)."""
    pt, ph, pw = dims.patch_size
    return dims.in_channels * pt * ph * pw * precision.compute_bytes


def outer_saved_bytes_per_token(dims: ModelDims, precision: Precision) -> float:
    """Bytes kept per video token outside the blocks, without context parallelism."""
    return outer_local_bytes_per_token(dims, precision) + outer_global_bytes_per_token(dims, precision)


def latent_bytes_per_token(dims: ModelDims) -> float:
    """One fp32 latent-space tensor (output channels x patch) per video token."""
    pt, ph, pw = dims.patch_size
    return dims.out_channels * pt * ph * pw * FP32


def context_saved_bytes(dims: ModelDims, precision: Precision) -> float:
    """Text (and image) context kept per video: cross-attention K/V of every block."""
    cb = precision.compute_bytes
    d = dims.hidden
    per_layer = dims.text_len * (4 * d * cb + FP32)
    per_layer += dims.image_len * (3 * d * cb + FP32)
    embed = (dims.text_len + dims.image_len) * (dims.text_dim * cb + 3 * d * cb)
    return dims.num_layers * per_layer + embed


@dataclass(frozen=True)
class Estimate:
    """Per-rank bytes of one training step, by part; `peak` is what the budget is for.

    `model_state` is what stays resident through the step (parameter shards, AdamW
    moments, the reference); `transient` is what the peak phase holds on top of the
    activations (working set, gradients), so `peak` is the sum of the four. `phases`
    gives the top of each phase above state and FSDP buffers."""

    model_state: float
    fsdp_buffers: float
    activations: float
    transient: float
    phases: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def peak(self) -> float:
        return self.model_state + self.fsdp_buffers + self.activations + self.transient

    def as_mb(self) -> dict[str, float]:
        mb = 2.0**20
        return {
            "model_state": self.model_state / mb,
            "fsdp_buffers": self.fsdp_buffers / mb,
            "activations": self.activations / mb,
            "transient": self.transient / mb,
            "peak": self.peak / mb,
        }


def estimate_peak(
    dims: ModelDims,
    layout: Layout,
    frames: int,
    latent_hw: tuple[int, int],
    world_size: int,
    precision: Precision | None = None,
) -> Estimate:
    """Predicted per-rank peak of one Reg-DPO step at `frames` latent frames.

    The step (videodpo.trainer's order) runs the policy forward on the rank's videos,
    then the frozen reference's forward under no_grad, then backward and AdamW. Without
    checkpointing the peak is during the reference forward or at the end of the policy
    forward, on top of everything the policy keeps; with it, the larger of that and the
    backward of one recomputed block on top of the block inputs.
    """
    precision = precision or Precision()
    if world_size % layout.ranks_needed():
        raise ValueError(f"layout {layout.name}: cp*pair = {layout.ranks_needed()} does not divide {world_size} ranks")
    cb = precision.compute_bytes
    d = dims.hidden
    params = param_count(dims)
    shards = layout.fsdp_shards or world_size
    # Resident: policy fp32 shard + two AdamW moments + reference shard. Gradients are
    # counted in the phase that holds them.
    model_state = params * (3 * FP32 + precision.reference_bytes) / shards
    gradients = params * FP32 / shards
    # Unsharded parameters of the root and of two blocks (current + prefetched; one in a
    # one-block model), and one block's unsharded gradient before its reduce-scatter.
    fsdp_buffers = 0.0
    if shards > 1:
        unsharded_blocks = min(2, dims.num_layers)
        fsdp_buffers = (root_params(dims) + unsharded_blocks * block_params(dims)) * cb + block_params(dims) * FP32

    videos = layout.videos_per_rank
    tokens = frames * tokens_per_frame(dims, *latent_hw)  # of one video
    local = tokens / layout.cp  # of one video on this rank
    block = block_saved_bytes_per_token(dims, precision)
    latent = latent_bytes_per_token(dims)
    # Latent-space tensors are whole on every rank: the input before the split, the
    # loss's tensors after `proj_out`'s gather (and the gathered prediction itself).
    whole = outer_global_bytes_per_token(dims, precision) + BACKWARD_LATENT * latent
    cp_buffers = 0.0
    if layout.cp > 1:
        block += CP_BLOCK_HIDDEN * d * cb
        whole += CP_GATHERED_LATENT * latent
        cp_buffers = CP_TRANSIENT_HIDDEN * d * cb
    outer_local = outer_local_bytes_per_token(dims, precision)
    context = videos * context_saved_bytes(dims, precision)
    per_layer = d * cb if layout.ac else block
    kept = videos * (local * (dims.num_layers * per_layer + outer_local) + tokens * whole) + context
    forward_live = videos * tokens * FORWARD_LATENT * latent
    reference = videos * local * ((REFERENCE_HIDDEN * d + REFERENCE_FFN * dims.ffn_dim) * cb + cp_buffers)
    # The first block's gradient during its backward: without FSDP it lands in the
    # parameters' .grad (fp32); under FSDP its unsharded form is in fsdp_buffers.
    first_block_grad = 0.0 if shards > 1 else block_params(dims) * FP32
    if layout.ac:
        recompute = videos * local * (block + cp_buffers)
        phases = {"forward": kept + forward_live + reference, "backward": kept + recompute + first_block_grad}
    else:
        end_of_forward = videos * (tokens * END_OF_FORWARD_LATENT * latent + local * END_OF_FORWARD_HIDDEN * d * cb)
        phases = {"forward": kept + forward_live + max(end_of_forward, reference), "backward": kept + first_block_grad}
    # Optimizer step: every gradient shard; AdamW's temporaries (one per tensor on the
    # CPU, a foreach list on CUDA) are not counted.
    phases["optimizer"] = gradients
    transient = max(phases.values()) - kept
    return Estimate(model_state, fsdp_buffers, kept, transient, phases)


def max_frames_estimate(
    dims: ModelDims,
    layout: Layout,
    latent_hw: tuple[int, int],
    world_size: int,
    budget_bytes: float,
    precision: Precision | None = None,
    limit: int = 100_000,
) -> int:
    """Largest latent frame count whose estimated peak fits the budget (0 if none)."""
    lo, hi = 0, 1
    while hi <= limit and estimate_peak(dims, layout, hi, latent_hw, world_size, precision).peak <= budget_bytes:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_peak(dims, layout, mid, latent_hw, world_size, precision).peak <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def latent_size(resolution: str | tuple[int, int], vae_spatial: int = VAE_SPATIAL) -> tuple[int, int]:
    """(height, width) of the latent for a named resolution or a pixel (H, W)."""
    h, w = RESOLUTIONS[resolution] if isinstance(resolution, str) else resolution
    return math.ceil(h / vae_spatial), math.ceil(w / vae_spatial)


def with_layers(dims: ModelDims, num_layers: int) -> ModelDims:
    return replace(dims, num_layers=num_layers)
