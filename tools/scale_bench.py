"""Real-shape benchmark: videodpo's Reg-DPO step at the released models' width, random weights.

The transformers of Wan2.1-T2V-1.3B, Wan2.1-I2V-14B and CogVideoX-5B are built from
their real configs (written below, no weights needed) with random init.

On the CPU the depth is cut to a few blocks at full width, the clip is a few latent
frames at the real tokens per frame (480p: a 60x104 latent, 1560 tokens a frame with
2x2 patches; 720p: 90x160, 3600), and for each layout (plain, AC, pair 2, cp 2; pair and
cp on 2 gloo ranks) one step of `videodpo.trainer` runs in fresh processes. Per row:
step time, saved-activation bytes (`saved_tensors_hooks`), the per-rank peak (VmHWM
method of `common.metrics`, plus resident model state, as `tools/memory_bench.py`
does), the model FLOPs of the step, and `tools/memory_estimator.py`'s estimate.
`estimator_error_real_width` is the largest relative error of the estimate over the
rows it covers (Wan). The full-depth, 81-frame table is an EXTRAPOLATION: the estimator
at full depth scaled by its measured error, and time from the measured FLOP rate.

Also measured: `overhead_ratio`, the median step time of `videodpo.trainer` over that of
a bare hand-written Reg-DPO loop on the same model and batch (alternating, one process);
and `setup_rss_ratio`, the peak host RSS of `build_training_state` per rank on 2 ranks
over that of 1 process, for a ~300M-parameter transformer saved as a diffusers model.

On CUDA (`--cuda`, one GPU, or several under torchrun) the model is built at full depth
and the tool prints seconds per step, peak memory and MFU for `--peak-tflops`.

    python tools/scale_bench.py --quick --out runs/scale
    python tools/scale_bench.py --cuda --model Wan2.1-T2V-1.3B --resolution 480p --frames 21 \\
        --layout ac --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/scale_bench.py`
    sys.path.insert(0, str(ROOT))

from tools import memory_bench  # noqa: E402
from tools.memory_estimator import Layout, ModelDims, Precision, estimate_peak, latent_frames  # noqa: E402

MB = 2.0**20
GB = 2.0**30


# ---- the real models ----------------------------------------------------------------------


@dataclass(frozen=True)
class RealModel:
    """A released video transformer: its diffusers class kwargs at full depth and its inputs."""

    name: str
    family: str  # wan | cogvideox
    task: str  # t2v | i2v
    config: dict[str, Any]
    text_len: int  # text tokens the model sees (Wan: 512 UMT5 tokens; CogVideoX: 226 T5 tokens)
    image_len: int = 0  # Wan I2V: CLIP image tokens
    latents: dict[str, tuple[int, int]] = field(default_factory=dict)  # resolution -> latent (h, w)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def hidden(self) -> int:
        return int(self.config["num_attention_heads"] * self.config["attention_head_dim"])

    @property
    def patch(self) -> tuple[int, int, int]:
        p = self.config["patch_size"]
        if isinstance(p, (tuple, list)):
            return tuple(int(v) for v in p)
        return (int(self.config.get("patch_size_t") or 1), int(p), int(p))

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("out_channels") or self.config["in_channels"])

    def at_depth(self, blocks: int) -> RealModel:
        return replace(self, config={**self.config, "num_layers": blocks})

    def tokens_per_frame(self, latent_hw: tuple[int, int]) -> int:
        _, ph, pw = self.patch
        return (latent_hw[0] // ph) * (latent_hw[1] // pw)

    def dims(self) -> ModelDims | None:
        """The estimator's view (Wan only; the estimator models `WanTransformerBlock`)."""
        if self.family != "wan":
            return None
        return ModelDims.from_wan_config(self.config, text_len=self.text_len, image_len=self.image_len)

    def build(self, dtype: Any = None, device: Any = None) -> Any:
        """The transformer with random init (`torch.manual_seed` first for equal copies)."""
        import torch

        cls = _transformer_class(self.family)
        with torch.device(device or "cpu"):
            model = cls(**self.config)
        if dtype is not None and dtype != torch.float32:
            torch.nn.Module.to(model, dtype)  # diffusers' own `to` warns about the fp32 modules
            keep = getattr(model, "_keep_in_fp32_modules", None) or []
            for name, module in model.named_modules():
                if any(k in name.split(".") for k in keep):
                    module.float()
        return model

    def adapter(self, transformer: Any) -> Any:
        """A videodpo adapter over `transformer` with no encoders (training on latents)."""
        import torch

        from videodpo.objective import DiffusionObjective

        if self.family == "wan":
            from videodpo.models.wan import WanAdapter

            return WanAdapter(transformer, scheduler=None, task=self.task, objective=DiffusionObjective("flow_matching"),
                              prompt_encoder=lambda prompts: None)
        from videodpo.models.cogvideox import CogVideoXAdapter

        # CogVideoX-5B trains with v-prediction on a scaled-linear DDPM schedule.
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas = torch.cumprod(1 - betas, 0).float()
        return CogVideoXAdapter(transformer, scheduler=None, task=self.task,
                                objective=DiffusionObjective("v_prediction", alphas_cumprod=alphas),
                                prompt_encoder=lambda prompts: None)

    def batch(self, frames: int, latent_hw: tuple[int, int], seed: int = 0, dtype: Any = None,
              device: Any = None) -> Any:
        """One preference pair of random latents and conditions at the model's real shapes."""
        import torch

        from videodpo.data.pairs import PairBatch

        g = torch.Generator().manual_seed(seed)
        c = self.latent_channels
        shape = (1, c, frames, *latent_hw)
        text_dim = self.config.get("text_dim") or self.config["text_embed_dim"]
        cond = {"text": torch.randn(1, self.text_len, text_dim, generator=g)}
        if self.task == "i2v":
            extra = self.config["in_channels"] - c
            cond["image_latents"] = torch.randn(1, extra, frames, *latent_hw, generator=g)
            if self.image_len:
                cond["image_embeds"] = torch.randn(1, self.image_len, self.config["image_dim"], generator=g)
        if dtype is not None:
            cond = {k: v.to(dtype) for k, v in cond.items()}
        batch = PairBatch(torch.randn(shape, generator=g), torch.randn(shape, generator=g), cond)
        return batch.to(device) if device is not None else batch


def _transformer_class(family: str) -> type:
    if family == "wan":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel


# Wan latents: the VAE downsamples 8x in space, 4x in time (memory_estimator.latent_size).
WAN_LATENTS = {"480p": (60, 104), "720p": (90, 160)}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json, checked against the signature
# of diffusers' WanTransformer3DModel (0.42): dim 12 x 128 = 1536, 30 layers, ffn 8960.
WAN21_T2V_1_3B = RealModel(
    name="Wan2.1-T2V-1.3B", family="wan", task="t2v", text_len=512, latents=WAN_LATENTS,
    config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                rope_max_seq_len=1024),
)
# Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer/config.json: dim 40 x 128 = 5120,
# 40 layers, ffn 13824, 36 input channels (16 noise + 4 mask + 16 first-frame latent),
# CLIP ViT-H image tokens (257 x 1280) through added K/V of width 5120.
WAN21_I2V_14B = RealModel(
    name="Wan2.1-I2V-14B", family="wan", task="i2v", text_len=512, image_len=257, latents=WAN_LATENTS,
    config=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
                rope_max_seq_len=1024),
)
# THUDM/CogVideoX-5b transformer: diffusers' CogVideoXTransformer3DModel defaults (head
# dim 64, time_embed_dim 512, text_embed_dim 4096, patch 2, 226 text tokens, 60x90 sample
# latent) with what scripts/convert_cogvideox_to_diffusers.py sets for 5B: 42 layers,
# 48 heads (dim 3072), rotary positions. Its native clip is 480x720 (latent 60x90).
COGVIDEOX_5B = RealModel(
    name="CogVideoX-5B", family="cogvideox", task="t2v", text_len=226,
    latents={"480p": (60, 90), "720p": (90, 160)},
    config=dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                time_embed_dim=512, text_embed_dim=4096, num_layers=42, patch_size=2, max_text_seq_length=226,
                sample_width=90, sample_height=60, sample_frames=49, use_rotary_positional_embeddings=True,
                use_learned_positional_embeddings=False),
)
REAL_MODELS = {m.name: m for m in (WAN21_T2V_1_3B, WAN21_I2V_14B, COGVIDEOX_5B)}


# ---- model FLOPs ---------------------------------------------------------------------------


def forward_flops(model: RealModel, frames: int, latent_hw: tuple[int, int]) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one forward on one video, by kind:

    `video_linear` (projections and FFN on the video tokens, and the head), `patch`
    (the patch embedding, whose input is data), `context_linear` (text, time and image
    embedders, and Wan's cross-attention K/V on the context: nothing a frozen model needs
    a gradient through), `self_attention` and `cross_attention` (score and value
    products); `linear` and `attention` are the sums."""
    d = model.hidden
    cfg = model.config
    pt, ph, pw = model.patch
    s = frames // pt * model.tokens_per_frame(latent_hw)
    lt, li = model.text_len, model.image_len
    layers = model.num_layers
    patch = 2 * s * cfg["in_channels"] * pt * ph * pw * d
    head = 2 * s * d * model.latent_channels * pt * ph * pw
    if model.family == "wan":
        f = cfg["ffn_dim"]
        # self-attention q, k, v, out; cross-attention q, out; FFN
        video_linear = layers * (2 * s * d * d * 4 + 2 * s * d * d * 2 + 2 * s * d * f * 2) + head
        context_linear = layers * 2 * (lt + li) * d * d * 2  # cross-attention k, v (add_k/add_v for the image)
        context_linear += 2 * lt * (cfg["text_dim"] * d + d * d)  # text embedder
        context_linear += 2 * (cfg["freq_dim"] * d + d * d + d * 6 * d)  # time embedder and projection
        if li:
            i = cfg["image_dim"]
            context_linear += 2 * li * (i * i + i * d)  # image embedder
        self_attention = layers * 4 * s * s * d
        cross_attention = layers * 4 * s * (lt + li) * d
    else:  # CogVideoX: joint attention over text + video tokens, FFN on both
        t = s + lt
        f = 4 * d  # diffusers FeedForward(mult=4)
        e = cfg["time_embed_dim"]
        video_linear = layers * (2 * t * d * d * 4 + 2 * t * d * f * 2) + head  # qkv/out, FFN
        context_linear = 2 * lt * cfg["text_embed_dim"] * d  # text projection in the patch embedding
        context_linear += 2 * (d * e + e * e) + layers * 2 * 2 * e * 6 * d + 2 * e * 2 * d  # time, adaLN, norm_out
        self_attention = layers * 4 * t * t * d
        cross_attention = 0
    parts = {"video_linear": video_linear, "patch": patch, "context_linear": context_linear,
             "self_attention": self_attention, "cross_attention": cross_attention}
    out = {k: float(v) for k, v in parts.items()}
    out["linear"] = out["video_linear"] + out["patch"] + out["context_linear"]
    out["attention"] = out["self_attention"] + out["cross_attention"]
    return out


def step_flops(model: RealModel, frames: int, latent_hw: tuple[int, int], lora: bool = False) -> float:
    """Model FLOPs of one Reg-DPO step on one pair: policy forward and backward on both
    videos, reference forward on both; activation-checkpoint recomputation not counted.

    Full fine-tuning uses the usual convention, a backward costs twice its forward. With
    LoRA the frozen weights get no gradient: the backward computes input gradients of
    the video-token linears (one forward's worth), both products of self-attention and
    the query side of cross-attention, and nothing on the context path (LoRA's own
    rank-r products are left out: under 1% at rank 16)."""
    fwd = forward_flops(model, frames, latent_hw)
    one = fwd["linear"] + fwd["attention"]
    if lora:
        policy = one + fwd["video_linear"] + 2 * fwd["self_attention"] + fwd["cross_attention"]
    else:
        policy = 3 * one
    return 2 * (policy + one)


# ---- one measured step, in fresh processes --------------------------------------------------


@dataclass(frozen=True)
class LayoutSpec:
    """A CPU layout: the trainer's parallel config and the estimator's layout."""

    name: str
    world: int
    ac: bool = False
    pair: int = 1
    cp: int = 1

    def estimator_layout(self) -> Layout:
        return Layout(self.name, ac=self.ac, cp=self.cp, pair=self.pair, fsdp_shards=self.world)


LAYOUTS = {
    "plain": LayoutSpec("plain", 1),
    "ac": LayoutSpec("ac", 1, ac=True),
    "pair2": LayoutSpec("pair2", 2, pair=2),
    "cp2": LayoutSpec("cp2", 2, cp=2),
}


@dataclass(frozen=True)
class Case:
    model: RealModel  # already cut to the blocks run
    layout: LayoutSpec
    resolution: str
    frames: int  # latent frames
    latent_hw: tuple[int, int]


@dataclass
class Row:
    model: str
    width: int
    blocks_run: int
    resolution: str
    frames: int
    tokens: int  # video tokens of one sample
    layout: str
    ranks: int
    step_s: float  # wall time, max over ranks
    step_cpu_s: float  # CPU time of the step's process, max over ranks (less sensitive to a shared machine)
    peak_mb: float  # max over ranks: step peak above baseline + resident model state
    saved_mb: float  # max over ranks: bytes autograd saved for backward (each storage once)
    estimate_mb: float | None
    estimate_activations_mb: float | None
    error: float | None  # (estimate - peak) / peak
    flops: float  # model FLOPs of the step (all ranks together)
    tflops_per_s: float
    method: str


def _saved_bytes_counter() -> tuple[Any, Callable[[], int]]:
    """`saved_tensors_hooks` that count each saved storage once, parameters left out."""
    import torch
    from torch import nn

    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter):
            storage = t.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lambda: sum(kept.values())


def model_state_bytes(state: Any) -> int:
    """Resident bytes of this rank's parameters (policy, reference) and AdamW moments."""
    return memory_bench.model_state_bytes(state.policy, state.reference, state.optimizer)


def run_config(layout: LayoutSpec, lora: bool = False, mixed_precision: str = "no") -> Any:
    from videodpo.config import (
        LoraConfig,
        LossConfig,
        OptimConfig,
        ParallelConfig,
        RunConfig,
        TrainConfig,
    )

    return RunConfig(
        loss=LossConfig(kind="reg_dpo", beta=500.0, sft_weight=1.0), optim=OptimConfig(lr=1e-5),
        lora=LoraConfig(enabled=lora), train=TrainConfig(steps=1000, seed=0, mixed_precision=mixed_precision),
        parallel=ParallelConfig(pair=layout.pair, cp=layout.cp, activation_checkpointing=1 if layout.ac else 0),
    )


def measure_on_rank(case: Case) -> dict[str, Any]:
    """This rank's part of one case: build, warm up on a tiny clip, measure one step."""
    import gc

    import torch
    import torch.distributed as dist

    from common.metrics import current_memory_mb, peak_memory_mb, reset_peak_memory
    from videodpo.step import build_training_step

    torch.manual_seed(0)
    model = case.model
    adapter = model.adapter(model.build())
    step_fn, state = build_training_step(run_config(case.layout), adapter)
    _, ph, pw = model.patch
    step_fn(model.batch(1, (2 * ph, 2 * pw)))  # warm-up: AdamW moments exist, kernels loaded
    state.optimizer.zero_grad(set_to_none=True)  # the measured step allocates its gradients
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    reset_peak_memory()
    baseline = current_memory_mb()
    hooks, saved_bytes = _saved_bytes_counter()
    start, start_cpu = time.perf_counter(), time.process_time()
    with hooks:
        step_fn(model.batch(case.frames, case.latent_hw, seed=1))
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    step_peak = peak_memory_mb() - baseline
    if dist.is_initialized():
        dist.barrier()
    return {"step_peak": step_peak * MB, "model_state": float(model_state_bytes(state)), "step_s": elapsed,
            "cpu_s": cpu_s, "saved": float(saved_bytes())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., dict], args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), CUDA_VISIBLE_DEVICES="")
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        result = {"ok": True, **fn(*args)}
    except BaseException:  # noqa: BLE001 - the parent reports it
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_fresh(fn: Callable[..., dict], world: int, *args: Any) -> list[dict[str, Any]]:
    """`fn(*args)` on `world` fresh processes (gloo when 2+), one thread each; their dicts.

    The processes fork from a server that imported torch and diffusers once and started
    with `MALLOC_MMAP_THRESHOLD_` set (glibc reads it at start), so VmHWM is repeatable.
    """
    import multiprocessing as std_mp

    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    std_mp.set_forkserver_preload(["torch", "diffusers", "videodpo.trainer", "tools.scale_bench"])
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(world, _free_port(), fn, args, out_dir), nprocs=world, join=True,
                           start_method="forkserver")
        results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if not res["ok"]]
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def estimate_for(case: Case) -> Any:
    dims = case.model.dims()
    if dims is None:
        return None
    return estimate_peak(dims, case.layout.estimator_layout(), case.frames, case.latent_hw, case.layout.world,
                         Precision())


def measure_case(case: Case) -> Row:
    ranks = run_fresh(measure_on_rank, case.layout.world, case)
    peaks = [(r["step_peak"] + r["model_state"]) / MB for r in ranks]
    peak = max(peaks)
    step_s = max(r["step_s"] for r in ranks)
    est = estimate_for(case)
    flops = step_flops(case.model, case.frames, case.latent_hw)
    return Row(
        model=case.model.name, width=case.model.hidden, blocks_run=case.model.num_layers,
        resolution=case.resolution, frames=case.frames,
        tokens=case.frames // case.model.patch[0] * case.model.tokens_per_frame(case.latent_hw),
        layout=case.layout.name, ranks=case.layout.world, step_s=step_s,
        step_cpu_s=max(r["cpu_s"] for r in ranks), peak_mb=peak,
        saved_mb=max(r["saved"] for r in ranks) / MB,
        estimate_mb=est.peak / MB if est is not None else None,
        estimate_activations_mb=est.activations / MB if est is not None else None,
        error=(est.peak / MB - peak) / peak if est is not None else None,
        flops=flops, tflops_per_s=flops / step_s / 1e12, method="cpu_vmhwm",
    )


# ---- framework overhead ----------------------------------------------------------------------


def bare_reg_dpo_step(policy: Any, reference: Any, optimizer: Any, batch: Any, generator: Any,
                      beta: float, sft_weight: float, grad_clip: float) -> float:
    """A hand-written Reg-DPO step on a Wan transformer (flow matching), no framework:
    shared t and noise per pair, policy and reference forward, backward, clip, AdamW."""
    import torch
    import torch.nn.functional as F

    optimizer.zero_grad(set_to_none=True)
    b = batch.chosen.shape[0]
    sigma = torch.rand(b, generator=generator)
    noise = torch.randn(batch.chosen.shape, generator=generator)
    x0 = torch.cat([batch.chosen, batch.rejected])
    eps = torch.cat([noise, noise])
    s = torch.cat([sigma, sigma]).view(-1, 1, 1, 1, 1)
    noisy, target = (1 - s) * x0 + s * eps, eps - x0
    timestep = torch.cat([sigma, sigma]) * 1000
    text = torch.cat([batch.cond["text"], batch.cond["text"]])
    pred = policy(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    err = (pred.float() - target).square().flatten(1).mean(1)
    with torch.no_grad():
        ref = reference(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        err_ref = (ref.float() - target).square().flatten(1).mean(1)
    d = (err[:b] - err_ref[:b]) - (err[b:] - err_ref[b:])
    loss = (-F.logsigmoid(-0.5 * beta * d) + sft_weight * err[:b]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def measure_overhead(model: RealModel, frames: int, latent_hw: tuple[int, int], repeats: int) -> dict[str, Any]:
    """Median step time through `videodpo.trainer` and through `bare_reg_dpo_step`, on
    copies of the same model and the same batch, alternating in this process."""
    import copy

    import torch

    from videodpo.step import build_training_step

    torch.manual_seed(0)
    transformer = model.build()
    bare_policy = copy.deepcopy(transformer)
    bare_reference = copy.deepcopy(transformer).requires_grad_(False).eval()
    cfg = run_config(LAYOUTS["plain"])
    step_fn, _ = build_training_step(cfg, model.adapter(transformer))
    optimizer = torch.optim.AdamW(bare_policy.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    generator = torch.Generator().manual_seed(0)
    batch = model.batch(frames, latent_hw)

    def bare() -> None:
        bare_reg_dpo_step(bare_policy, bare_reference, optimizer, batch, generator, cfg.loss.beta,
                          cfg.loss.sft_weight, cfg.optim.grad_clip)

    def trainer() -> None:
        step_fn(batch)

    # Wall time and this process's CPU time (one thread: the compute itself, which other
    # processes sharing the cores do not inflate); the ratio is of CPU-time medians.
    wall: dict[str, list[float]] = {"trainer": [], "bare": []}
    cpu: dict[str, list[float]] = {"trainer": [], "bare": []}
    for i in range(repeats + 1):  # the first pair warms up (AdamW moments, kernels)
        for name, fn in (("trainer", trainer), ("bare", bare)) if i % 2 == 0 else (("bare", bare), ("trainer", trainer)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if i:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    return {"trainer_cpu_s": med["trainer"], "bare_cpu_s": med["bare"], "overhead_ratio": med["trainer"] / med["bare"],
            "trainer_wall_s": med_wall["trainer"], "bare_wall_s": med_wall["bare"],
            "overhead_ratio_wall": med_wall["trainer"] / med_wall["bare"], "cpu_times": cpu, "wall_times": wall,
            "model": model.name, "blocks_run": model.num_layers, "frames": frames, "latent_hw": list(latent_hw)}


# ---- set-up memory -----------------------------------------------------------------------------


def setup_model(num_layers: int = 17) -> RealModel:
    """A Wan T2V transformer of about 300M parameters (17 blocks of width 1024)."""
    cfg = dict(WAN21_T2V_1_3B.config, num_attention_heads=8, ffn_dim=4096, num_layers=num_layers)
    return replace(WAN21_T2V_1_3B, name=f"Wan-T2V-{num_layers}x1024", config=cfg)


def save_diffusers_model(model: RealModel, path: Path) -> int:
    """`model` with random init as a diffusers Wan pipeline directory holding only the
    transformer and the scheduler (what training from a latent cache needs); its size."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    transformer = model.build()
    params = sum(p.numel() for p in transformer.parameters())
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(path)
    return params


def setup_peak_on_rank(model_path: str, world: int) -> dict[str, Any]:
    """Peak RSS above the post-import baseline while `build_training_state` loads the
    model, builds the reference, shards (2 ranks) and creates the optimizer."""
    import gc

    from common.metrics import current_memory_mb, peak_memory_mb, reset_peak_memory
    from videodpo.state import build_training_state

    cfg = run_config(LAYOUTS["plain"] if world == 1 else LayoutSpec("fsdp2", world))
    cfg.model.path = model_path
    cfg.data.latent_cache = "unused"  # training from latents: no VAE or text encoder is loaded (none is saved)
    gc.collect()
    reset_peak_memory()
    baseline = current_memory_mb()
    start = time.perf_counter()
    state = build_training_state(cfg)
    elapsed = time.perf_counter() - start
    peak = peak_memory_mb() - baseline
    return {"peak_mb": peak, "held_mb": current_memory_mb() - baseline, "setup_s": elapsed,
            "state_mb": model_state_bytes(state) / MB}


def measure_setup(model: RealModel) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        params = run_fresh(_save_on_rank, 1, model, str(path))[0]["params"]
        one = run_fresh(setup_peak_on_rank, 1, str(path), 1)[0]
        two = run_fresh(setup_peak_on_rank, 2, str(path), 2)
    per_rank = [r["peak_mb"] for r in two]
    return {"params": params, "one_process_peak_mb": one["peak_mb"], "two_rank_peak_mb": per_rank,
            "one_process_held_mb": one["held_mb"], "two_rank_held_mb": [r["held_mb"] for r in two],
            "state_mb": {"one": one["state_mb"], "two": [r["state_mb"] for r in two]},
            "setup_s": {"one": one["setup_s"], "two": max(r["setup_s"] for r in two)},
            "setup_rss_ratio": max(per_rank) / one["peak_mb"]}


def _save_on_rank(model: RealModel, path: str) -> dict[str, Any]:
    return {"params": save_diffusers_model(model, Path(path))}


# ---- extrapolation to full depth and 81 frames -------------------------------------------------


def extrapolate(rows: list[Row], models: dict[str, RealModel] | None = None,
                video_frames: int = 81) -> list[dict[str, Any]]:
    """EXTRAPOLATION to full depth and `video_frames` frames, one line per measured row:
    the estimator at full size times the row's measured/estimated ratio (Wan), and the
    step's CPU time scaled by the FLOPs (this CPU, one thread a rank)."""
    out = []
    for row in rows:
        full = (models or REAL_MODELS)[row.model]
        hw = full.latents[row.resolution]
        frames = latent_frames(video_frames)
        flops = step_flops(full, frames, hw)
        item = {"model": row.model, "resolution": row.resolution, "layout": row.layout, "layers": full.num_layers,
                "latent_frames": frames, "tokens": frames * full.tokens_per_frame(hw), "step_tflops": flops / 1e12,
                "cpu_step_s_extrapolated": row.step_cpu_s * flops / row.flops, "peak_gb_extrapolated": None}
        dims = full.dims()
        if dims is not None and row.estimate_mb:
            spec = LAYOUTS[row.layout]
            est = estimate_peak(dims, spec.estimator_layout(), frames, hw, spec.world, Precision()).peak
            item["peak_gb_extrapolated"] = est * (row.peak_mb / row.estimate_mb) / GB
            item["peak_gb_estimator"] = est / GB
        out.append(item)
    return out


# ---- plans and the run -------------------------------------------------------------------------


@dataclass
class Plan:
    """What one bench run measures."""

    cases: list[tuple[str, int, str, int, str]]  # (model, blocks, resolution, latent frames, layout)
    overhead: tuple[str, int, tuple[int, int], int]  # (model, blocks, latent (h, w), repeats), 1 frame
    setup_layers: int = 17
    models: dict[str, RealModel] = field(default_factory=lambda: dict(REAL_MODELS))


def quick_plan() -> Plan:
    layouts = list(LAYOUTS)
    return Plan(cases=[("Wan2.1-T2V-1.3B", 1, "480p", 1, lay) for lay in layouts],
                overhead=("Wan2.1-T2V-1.3B", 1, (30, 52), 3))


def full_plan() -> Plan:
    cases = [("Wan2.1-T2V-1.3B", 1, "480p", 2, lay) for lay in LAYOUTS]
    cases += [("Wan2.1-T2V-1.3B", 2, "480p", 2, "plain"), ("Wan2.1-T2V-1.3B", 1, "720p", 1, "plain"),
              ("Wan2.1-T2V-1.3B", 1, "720p", 1, "cp2"), ("CogVideoX-5B", 1, "480p", 1, "plain"),
              ("CogVideoX-5B", 1, "480p", 1, "ac"), ("Wan2.1-I2V-14B", 1, "480p", 1, "pair2")]
    return Plan(cases=cases, overhead=("Wan2.1-T2V-1.3B", 1, (60, 104), 5))


def memory_needed_bytes(case: Case) -> float:
    """Rough host memory one case takes on all its ranks (the estimate, or 20 bytes a
    parameter plus a third for activations where there is none), plus the interpreters."""
    est = estimate_for(case)
    if est is not None:
        per_rank = est.peak
    else:
        with_meta = case.model.build(device="meta")
        per_rank = 20 * sum(p.numel() for p in with_meta.parameters()) / case.layout.world * 1.33
    return case.layout.world * (per_rank * 1.15 + 0.5 * GB)


def available_memory_bytes() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return float("inf")


def run_bench(plan: Plan, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure `plan`, writing `out/results.json` after each part; return what it holds.

    A case that would not fit in the memory available now is skipped and listed; a
    failing overhead or set-up measurement is reported in the results, not raised."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[Row] = []
    results: dict[str, Any] = {"estimator_error_real_width": None, "overhead_ratio": None, "setup_rss_ratio": None,
                               "rows": [], "skipped": []}

    def save() -> None:
        errors = [abs(r.error) for r in rows if r.error is not None]
        results.update(estimator_error_real_width=max(errors) if errors else None, rows=[asdict(r) for r in rows],
                       extrapolated_full_depth_81_frames=extrapolate(rows, plan.models),
                       machine={"cpus": os.cpu_count(), "threads_per_rank": 1, "load_average_now": os.getloadavg()},
                       wall_s=time.perf_counter() - started)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    for name, blocks, res, frames, layout in plan.cases:
        model = plan.models[name]
        case = Case(model.at_depth(blocks), LAYOUTS[layout], res, frames, model.latents[res])
        need, have = memory_needed_bytes(case), available_memory_bytes()
        if need > have:
            log(f"skipping {name} x{blocks} {res} {layout}: needs about {need / GB:.1f} GiB, {have / GB:.1f} available")
            results["skipped"].append({"model": name, "blocks": blocks, "resolution": res, "layout": layout,
                                       "need_gb": need / GB, "available_gb": have / GB})
            continue
        log(f"measuring {name} x{blocks} block(s) {res} {frames} latent frame(s) {layout} ...")
        rows.append(measure_case(case))
        log("  " + format_row(rows[-1]))
        save()
    name, blocks, hw, repeats = plan.overhead
    log(f"framework overhead on {name} x{blocks} block(s), latent {hw[0]}x{hw[1]}, {repeats} alternations ...")
    try:
        overhead = run_fresh(measure_overhead, 1, plan.models[name].at_depth(blocks), 1, hw, repeats)[0]
        overhead.pop("ok")
        results.update(overhead_ratio=overhead["overhead_ratio"], overhead=overhead)
        log(f"  CPU time: trainer {overhead['trainer_cpu_s']:.2f} s, bare {overhead['bare_cpu_s']:.2f} s, ratio "
            f"{overhead['overhead_ratio']:.3f} (wall {overhead['trainer_wall_s']:.2f} / {overhead['bare_wall_s']:.2f} s, "
            f"{overhead['overhead_ratio_wall']:.3f})")
    except RuntimeError as err:
        results["overhead"] = {"error": str(err)}
        log(f"  failed: {err}")
    save()
    log(f"set-up memory, {plan.setup_layers}-block Wan transformer, 1 process vs 2 ranks ...")
    try:
        setup = measure_setup(setup_model(plan.setup_layers))
        results.update(setup_rss_ratio=setup["setup_rss_ratio"], setup=setup)
        log(f"  {setup['params'] / 1e6:.0f}M params: 1 process {setup['one_process_peak_mb']:.0f} MiB, 2 ranks "
            f"{[round(v) for v in setup['two_rank_peak_mb']]} MiB per rank, ratio {setup['setup_rss_ratio']:.3f}")
    except RuntimeError as err:
        results["setup"] = {"error": str(err)}
        log(f"  failed: {err}")
    save()
    log(format_table(results))
    return results


def format_row(r: Row) -> str:
    est = f"{r.estimate_mb:9.0f}{100 * r.error:+7.1f}%" if r.estimate_mb is not None else f"{'-':>9}{'-':>8}"
    return (f"{r.model:<16}{r.width:>6}{r.blocks_run:>4}{r.resolution:>6}{r.tokens:>7}{r.layout:>7}"
            f"{r.step_s:>8.2f}{r.step_cpu_s:>8.2f}{r.peak_mb:>9.0f}{r.saved_mb:>9.0f}{est}{r.flops / 1e12:>8.2f}{r.tflops_per_s * 1e3:>8.1f}")


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'model':<16}{'width':>6}{'blk':>4}{'res':>6}{'tokens':>7}{'layout':>7}{'step s':>8}{'cpu s':>8}{'peak MiB':>9}"
             f"{'saved':>9}{'est MiB':>9}{'err':>8}{'TFLOP':>8}{'GFLOP/s':>8}"]
    lines += [format_row(Row(**r)) for r in results["rows"]]
    err = results["estimator_error_real_width"]
    lines.append(f"estimator_error_real_width {err:.3f}" if err is not None else "estimator_error_real_width n/a")
    ratios = {k: results[k] for k in ("overhead_ratio", "setup_rss_ratio")}
    lines.append("   ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in ratios.items()))
    lines += [f"skipped (memory): {x['model']} x{x['blocks']} {x['resolution']} {x['layout']}, needs "
              f"{x['need_gb']:.1f} GiB" for x in results["skipped"]]
    lines.append("EXTRAPOLATION (not measured) to full depth, 81 frames, fp32: peak = estimator x measured/estimated,"
                 " CPU s = step CPU time x FLOP ratio")
    lines.append(f"{'model':<16}{'res':>6}{'layout':>7}{'layers':>7}{'tokens':>8}{'TFLOP':>9}{'CPU s':>10}{'peak GB':>9}")
    for x in results["extrapolated_full_depth_81_frames"]:
        peak = f"{x['peak_gb_extrapolated']:9.1f}" if x["peak_gb_extrapolated"] is not None else f"{'-':>9}"
        lines.append(f"{x['model']:<16}{x['resolution']:>6}{x['layout']:>7}{x['layers']:>7}{x['tokens']:>8}"
                     f"{x['step_tflops']:>9.1f}{x['cpu_step_s_extrapolated']:>10.0f}{peak}")
    return "\n".join(lines)


# ---- CUDA: full depth ----------------------------------------------------------------------------


def cuda_step_report(model: RealModel, resolution: str, frames: int, layout: LayoutSpec, peak_tflops: float,
                     steps: int = 3, lora: bool = False, device: Any = None, dtype: Any = None,
                     latent_hw: tuple[int, int] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build `model` (random init, `dtype` weights, bf16 autocast on CUDA), run `steps`
    Reg-DPO steps of `videodpo.trainer` after one warm-up; seconds per step, peak memory
    and MFU against `peak_tflops`. Under torchrun the layout's pair/cp use those ranks."""
    import torch

    from common.metrics import peak_memory_mb, reset_peak_memory
    from videodpo.step import build_training_step

    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    torch.manual_seed(0)
    build_on = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None  # fast random init
    transformer = model.build(dtype=dtype, device=build_on)
    step_fn, state = build_training_step(run_config(layout, lora=lora, mixed_precision="bf16" if cuda else "no"),
                                         model.adapter(transformer))
    device = state.layout.device
    hw = latent_hw or model.latents[resolution]
    batch = model.batch(frames, hw, dtype=dtype, device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    step_fn(batch)  # warm-up
    sync()
    reset_peak_memory()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn(batch)
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = step_flops(model, frames, hw, lora=lora)
    ranks = state.layout.world_size
    report = {"model": model.name, "layers": model.num_layers, "resolution": resolution, "latent_frames": frames,
              "latent_hw": list(hw), "tokens": frames // model.patch[0] * model.tokens_per_frame(hw),
              "layout": layout.name, "lora": lora, "ranks": ranks, "dtype": str(dtype).replace("torch.", ""),
              "step_s": step_s, "times": times, "peak_memory_gb": peak_memory_mb() / 1024,
              "peak_memory_method": "cuda_max_allocated" if cuda else "cpu_vmhwm",
              "step_tflops": flops / 1e12, "achieved_tflops_per_gpu": flops / step_s / ranks / 1e12,
              "mfu": flops / step_s / ranks / (peak_tflops * 1e12),
              "device": torch.cuda.get_device_name() if cuda else "cpu"}
    log(f"{model.name} {model.num_layers} layers {resolution} {frames} latent frames ({report['tokens']} tokens) "
        f"{layout.name}{' LoRA' if lora else ' full'}: {step_s:.2f} s/step, peak {report['peak_memory_gb']:.1f} GB, "
        f"{report['achieved_tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {100 * report['mfu']:.1f}% "
        f"of {peak_tflops:g} TFLOP/s")
    return report


def cuda_layout(name: str, world: int) -> LayoutSpec:
    base = LAYOUTS[name]
    return replace(base, world=world)


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/scale_bench", help="directory for results.json")
    parser.add_argument("--quick", action="store_true", help="Wan2.1-T2V-1.3B, 1 block, 480p, 1 frame (~10 min)")
    parser.add_argument("--cuda", action="store_true", help="full depth on CUDA (torchrun for pair/cp)")
    parser.add_argument("--model", default="Wan2.1-T2V-1.3B", choices=sorted(REAL_MODELS))
    parser.add_argument("--resolution", default="480p", choices=["480p", "720p"])
    parser.add_argument("--frames", type=int, default=21, help="latent frames (--cuda); 21 = 81 video frames")
    parser.add_argument("--layout", default="ac", choices=sorted(LAYOUTS), help="--cuda layout")
    parser.add_argument("--lora", action="store_true", help="--cuda: LoRA instead of full fine-tuning")
    parser.add_argument("--steps", type=int, default=3, help="--cuda: timed steps after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    args = parser.parse_args(argv)
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            print("--cuda: no CUDA device here; run without --cuda for the CPU bench", file=sys.stderr)
            return 2
        world = int(os.environ.get("WORLD_SIZE", "1"))
        report = cuda_step_report(REAL_MODELS[args.model], args.resolution, args.frames,
                                  cuda_layout(args.layout, world), args.peak_tflops, steps=args.steps, lora=args.lora)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cuda_results.json").write_text(json.dumps(report, indent=2))
        return 0
    plan = quick_plan() if args.quick else full_plan()
    run_bench(plan, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
