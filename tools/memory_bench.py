"""Memory-capacity benchmark: how long a video each parallel layout can train per rank.

For each layout of the config (FSDP only, + activation checkpointing, + context
parallelism, + pair parallelism, all combined; all on the same ranks) the tool runs one
full Reg-DPO training step of the project's trainer (`videodpo.trainer.
build_training_step`: policy and reference forward, backward, clipping, AdamW) on a
tiny `WanTransformer3DModel` at chosen frame counts, each in a fresh process group,
and records the per-rank peak memory and step time. A capacity search finds the
largest latent frame count whose peak stays under `--budget` MiB per rank;
`capacity_ratio` is the combined layout's capacity over FSDP-only's, and
`capacity_ratio_vs_ac` over FSDP + activation checkpointing's.

`--world 4` runs the `world4` layouts on 4 gloo processes (they fit on 2 cores for a
memory measurement; they only run slower): there "combined" is AC + pair 2 + cp 2, the
layout 2 ranks cannot hold, compared with `fsdp_ac`.

Peak memory, per rank (`common.metrics`). On CUDA: `torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats` right before the step, less what was allocated then.
On the CPU (ENVIRONMENT.md): processes
run with `MALLOC_MMAP_THRESHOLD_=65536`; right before the step `malloc_trim(0)` and
`5 > /proc/self/clear_refs` reset the high-water mark to the current RSS (the
baseline); after the step `VmHWM - baseline` is the step's own peak. To it we add the
bytes of the resident model state (local parameter shards of policy and reference,
AdamW moments), so the number means what CUDA's max-allocated means: tensor memory at
the peak, without the interpreter and libraries. A warm-up step at one frame runs
first, so optimizer moments exist and lazily loaded kernels are not counted.

`tools/memory_estimator.py` predicts the same number from the model's dimensions; the
tool reports its error on every measurement and prints its estimate for Wan2.1-T2V-1.3B
and Wan2.1-I2V-14B at 480p and 720p on 8 x 80 GB.

    python tools/memory_bench.py --config configs/bench/wan_tiny.yaml --out runs/bench --quick
    python tools/memory_bench.py --world 4 --out runs/bench4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/memory_bench.py`
    sys.path.insert(0, str(ROOT))

from tools.memory_estimator import (  # noqa: E402
    WAN21_I2V_14B,
    WAN21_T2V_1_3B,
    WAN22_T2V_A14B_EXPERT,
    WAN22_TI2V_5B,
    Layout,
    ModelDims,
    Precision,
    estimate_peak,
    latent_size,
    max_frames_estimate,
    video_frames,
)

MB = 2.0**20
MEASURE_ATTEMPTS = 3  # a step that hit major page faults is measured again, up to this often
DEFAULT_CONFIG = ROOT / "configs" / "bench" / "wan_tiny.yaml"
REAL_MODELS = {"Wan2.1-T2V-1.3B": WAN21_T2V_1_3B, "Wan2.1-I2V-14B": WAN21_I2V_14B,
               "Wan2.2-TI2V-5B": WAN22_TI2V_5B, "Wan2.2-T2V-A14B (one expert)": WAN22_T2V_A14B_EXPERT}


# ---- configuration ------------------------------------------------------------------


@dataclass
class BenchModelConfig:
    """A tiny Wan T2V transformer (diffusers `WanTransformer3DModel` kwargs)."""

    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 16
    ffn_dim: int = 128
    channels: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    text_dim: int = 32
    text_len: int = 8
    freq_dim: int = 32

    def wan_kwargs(self) -> dict[str, Any]:
        return dict(
            patch_size=tuple(self.patch_size), num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim, in_channels=self.channels, out_channels=self.channels,
            text_dim=self.text_dim, freq_dim=self.freq_dim, ffn_dim=self.ffn_dim,
            num_layers=self.num_layers, cross_attn_norm=True, rope_max_seq_len=1024,
        )

    def dims(self) -> ModelDims:
        return ModelDims.from_wan_config(self.wan_kwargs(), text_len=self.text_len)


@dataclass
class SearchConfig:
    """Where to look for each layout's capacity."""

    budget_mb: float = 256.0
    latent_sizes: list[list[int]] = field(default_factory=lambda: [[32, 32]])  # latent (H, W)
    max_frames: int = 64
    # Also measure each layout at these fractions of its estimated capacity (the curve
    # below the budget, for the plot and the estimator check).
    sweep_fractions: list[float] = field(default_factory=list)
    layouts: list[str] = field(default_factory=list)  # names to run; empty = all


@dataclass
class EstimateConfig:
    """The estimate table for real models."""

    world_size: int = 8
    budget_gb: float = 80.0
    precision: str = "bf16"
    resolutions: list[str] = field(default_factory=lambda: ["480p", "720p"])
    layouts: list[Layout] = field(default_factory=list)


def _world4_layouts() -> list[Layout]:
    return [
        Layout("fsdp"),
        Layout("fsdp_ac", ac=True),
        Layout("combined", ac=True, pair=2, cp=2, cp_mode="ulysses"),
        Layout("combined_ring", ac=True, pair=2, cp=2, cp_mode="ring"),
    ]


@dataclass
class WorldConfig:
    """What `--world 4` runs: its layouts, the names compared and the search."""

    world_size: int = 4
    layouts: list[Layout] = field(default_factory=_world4_layouts)
    combined: str = "combined"
    baseline: str = "fsdp"
    ac_baseline: str = "fsdp_ac"
    search: SearchConfig = field(
        default_factory=lambda: SearchConfig(budget_mb=40.5, latent_sizes=[[16, 16]], max_frames=320)
    )


@dataclass
class BenchConfig:
    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    world_size: int = 2
    layouts: list[Layout] = field(default_factory=list)
    combined: str = "combined"  # the layout whose capacity is compared with `baseline`
    baseline: str = "fsdp"
    ac_baseline: str = "fsdp_ac"  # ... and with this one (`capacity_ratio_vs_ac`)
    full: SearchConfig = field(default_factory=SearchConfig)
    quick: SearchConfig = field(default_factory=SearchConfig)
    beta: float = 500.0
    sft_weight: float = 1.0
    lr: float = 1e-4
    seed: int = 0
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    world4: WorldConfig = field(default_factory=WorldConfig)


def on_world(cfg: BenchConfig, world: int) -> tuple[BenchConfig, SearchConfig | None]:
    """`cfg` set up for `--world`: 2 (or the config's own size) keeps it; 4 takes `world4`
    (its layouts, names and search)."""
    if world == cfg.world_size:
        return cfg, None
    if world != cfg.world4.world_size:
        from common.errors import ConfigError

        raise ConfigError(f"--world {world}: the config runs {cfg.world_size} ranks, or "
                          f"{cfg.world4.world_size} with its 'world4' section")
    w = cfg.world4
    return replace(cfg, world_size=w.world_size, layouts=list(w.layouts), combined=w.combined,
                   baseline=w.baseline, ac_baseline=w.ac_baseline), w.search


@dataclass
class Measurement:
    layout: str
    frames: int  # latent frames
    latent_h: int
    latent_w: int
    tokens: int  # video tokens of one sample
    peak_mb: float  # max over ranks: step peak above baseline + model state
    peak_mb_per_rank: list[float]
    step_peak_mb_per_rank: list[float]
    model_state_mb_per_rank: list[float]
    step_s: float
    estimate_mb: float
    error: float  # (estimate - measured) / measured
    method: str  # cuda_max_allocated | cpu_vmhwm
    # page faults that read from disk during the step, max over ranks: > 0 means the
    # machine was short of memory and evicted pages (VmHWM then reads low)
    major_faults: int = 0


# ---- one measurement, in fresh processes ----------------------------------------------


def _local_bytes(tensors: list[Any]) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def model_state_bytes(policy: Any, reference: Any, optimizer: Any) -> int:
    """Resident bytes of this rank's parameters (policy, reference) and AdamW moments."""
    tensors = list(policy.parameters()) + (list(reference.parameters()) if reference is not None else [])
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if hasattr(v, "numel") and v.numel() > 1]
    return _local_bytes(tensors)


def _trainer_step(cfg: BenchConfig, layout: Layout, h: int, w: int):
    """`(step(frames), model_state_bytes())` over the project's Reg-DPO training step,
    `videodpo.step.build_training_step`, with `layout` as its parallel config."""
    import torch
    from diffusers import WanTransformer3DModel

    from videodpo.config import LossConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig
    from videodpo.data.pairs import random_pair_batch
    from videodpo.models.wan import WanAdapter
    from videodpo.objective import DiffusionObjective
    from videodpo.step import build_training_step

    torch.manual_seed(cfg.seed)
    adapter = WanAdapter(WanTransformer3DModel(**cfg.model.wan_kwargs()), scheduler=None, task="t2v",
                         objective=DiffusionObjective("flow_matching"), prompt_encoder=lambda prompts: None)
    run = RunConfig(
        loss=LossConfig(kind="reg_dpo", beta=cfg.beta, sft_weight=cfg.sft_weight),
        optim=OptimConfig(lr=cfg.lr), train=TrainConfig(steps=2, seed=cfg.seed),
        parallel=ParallelConfig(cp=layout.cp, cp_mode=layout.cp_mode, pair=layout.pair,
                                activation_checkpointing=1 if layout.ac else 0),
    )
    step_fn, state = build_training_step(run, adapter)

    def step(frames: int) -> None:
        step_fn(random_pair_batch(adapter, 1, frames, h, w, seed=cfg.seed + frames))

    return step, lambda: model_state_bytes(state.policy, state.reference, state.optimizer)


def estimated_layout(cfg: BenchConfig, layout: Layout) -> Layout:
    """`layout` as the trainer shards it: FSDP over every rank (dp_shard x pair x cp)."""
    return replace(layout, fsdp_shards=layout.fsdp_shards or cfg.world_size)


def _measure_on_rank(cfg: BenchConfig, layout: Layout, frames: int, h: int, w: int) -> dict[str, Any]:
    """Build, warm up at one frame, then measure one step at `frames` (this rank)."""
    import gc
    import resource

    import torch
    import torch.distributed as dist

    from common.metrics import current_memory_mb, peak_memory_mb, reset_peak_memory

    step, state_bytes = _trainer_step(cfg, layout, h, w)
    step(1)  # warm-up: optimizer moments, lazily loaded kernels, allocator pools
    gc.collect()
    dist.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    reset_peak_memory()  # CPU: malloc_trim + clear_refs, VmHWM := VmRSS
    baseline = current_memory_mb()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    start = time.perf_counter()
    step(frames)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    step_peak = peak_memory_mb() - baseline
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
    dist.barrier()
    return {"step_peak": step_peak * MB, "model_state": float(state_bytes()), "step_s": elapsed,
            "major_faults": faults,
            "method": "cuda_max_allocated" if torch.cuda.is_available() else "cpu_vmhwm"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: BenchConfig, layout: Layout, frames: int,
               h: int, w: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    from common.distributed import init_distributed

    result: dict[str, Any]
    try:
        init_distributed()
        result = {"ok": True, **_measure_on_rank(cfg, layout, frames, h, w)}
    except BaseException:  # noqa: BLE001 - the parent reports it
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _start_forkserver() -> None:
    """Fresh processes per measurement, forked from a server that imported torch once.

    The server is started with the malloc setting that glibc reads at process start,
    and has imported torch, diffusers' Wan and this module, so each measurement pays
    for a fork and a process group, not for imports (about 7 s a rank here).
    """
    import multiprocessing as std_mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    std_mp.set_forkserver_preload(
        ["torch", "torch.distributed", "diffusers.models.transformers.transformer_wan", "videodpo.trainer",
         "tools.memory_bench"]
    )


def measure(cfg: BenchConfig, layout: Layout, frames: int, latent_hw: tuple[int, int]) -> Measurement:
    """One step at `frames` latent frames in fresh processes; per-rank peaks and time."""
    import torch.multiprocessing as mp

    h, w = latent_hw
    _start_forkserver()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(cfg.world_size, _free_port(), cfg, layout, frames, h, w, out_dir),
                           nprocs=cfg.world_size, join=True, start_method="forkserver")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(cfg.world_size)]
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(ranks) if not res["ok"]]
    if errors:
        raise RuntimeError(f"layout {layout.name} at {frames} frames failed:\n" + "\n".join(errors))
    peaks = [(r["step_peak"] + r["model_state"]) / MB for r in ranks]
    dims = cfg.model.dims()
    est = estimate_peak(dims, estimated_layout(cfg, layout), frames, latent_hw, cfg.world_size).peak / MB
    peak = max(peaks)
    tokens = frames * (h // dims.patch_size[1]) * (w // dims.patch_size[2])
    return Measurement(
        layout=layout.name, frames=frames, latent_h=h, latent_w=w, tokens=tokens, peak_mb=peak,
        peak_mb_per_rank=peaks, step_peak_mb_per_rank=[r["step_peak"] / MB for r in ranks],
        model_state_mb_per_rank=[r["model_state"] / MB for r in ranks],
        step_s=max(r["step_s"] for r in ranks), estimate_mb=est, error=(est - peak) / peak,
        method=ranks[0]["method"], major_faults=max(r["major_faults"] for r in ranks),
    )


# ---- capacity search ------------------------------------------------------------------


@dataclass
class Capacity:
    max_frames: int  # 0: not even one frame fits
    capped: bool  # True: max_frames is the search limit, the real capacity may be higher
    probes: dict[int, float]  # frames -> measured peak


def find_capacity(peak_at: Callable[[int], float], budget: float, guess: int, max_frames: int) -> Capacity:
    """Largest f in [1, max_frames] with peak_at(f) <= budget, for a peak that grows with f.

    Starts at `guess` (the estimator's answer), gallops away from it with doubling steps
    until the budget line is crossed, then bisects; each frame count is measured once.
    """
    probes: dict[int, float] = {}

    def fits(f: int) -> bool:
        if f not in probes:
            probes[f] = peak_at(f)
        return probes[f] <= budget

    guess = min(max(guess, 1), max_frames)
    step = 1
    if fits(guess):
        lo, hi = guess, None
        while hi is None:
            nxt = min(lo + step, max_frames)
            if nxt == lo:
                return Capacity(lo, True, probes)
            if fits(nxt):
                lo, step = nxt, step * 2
            else:
                hi = nxt
    else:
        lo, hi = None, guess
        while lo is None:
            nxt = hi - step
            if nxt < 1:
                lo = 0
            elif fits(nxt):
                lo = nxt
            else:
                hi, step = nxt, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return Capacity(lo, False, probes)


# ---- reporting ------------------------------------------------------------------------


def estimator_error(measurements: list[Measurement]) -> dict[str, float]:
    errors = [abs(m.error) for m in measurements]
    if not errors:
        return {"mean_abs_rel_error": float("nan"), "max_abs_rel_error": float("nan"), "count": 0}
    return {"mean_abs_rel_error": sum(errors) / len(errors), "max_abs_rel_error": max(errors),
            "count": len(errors)}


def repeatability(measurements: list[Measurement], previous: list[dict[str, Any]]) -> dict[str, Any]:
    """Relative difference of the peaks measured at the same point in two runs."""
    before = {(p["layout"], p["frames"], p["latent_h"], p["latent_w"]): p["peak_mb"] for p in previous}
    diffs = []
    for m in measurements:
        key = (m.layout, m.frames, m.latent_h, m.latent_w)
        if key in before:
            diffs.append({"layout": m.layout, "frames": m.frames, "latent": [m.latent_h, m.latent_w],
                          "peak_mb": m.peak_mb, "previous_mb": before[key],
                          "rel_diff": abs(m.peak_mb - before[key]) / before[key]})
    worst = max((d["rel_diff"] for d in diffs), default=float("nan"))
    return {"compared": len(diffs), "max_rel_diff": worst, "within_5_percent": bool(diffs) and worst <= 0.05,
            "points": diffs}


def estimate_table(cfg: EstimateConfig) -> list[dict[str, Any]]:
    """Estimated max frames of each real model, resolution and layout (no measurement)."""
    rows = []
    precision = Precision(compute=cfg.precision, reference=cfg.precision)
    budget = cfg.budget_gb * 2.0**30
    for model_name, dims in REAL_MODELS.items():
        for res in cfg.resolutions:
            hw = latent_size(res, dims.vae_spatial)
            for layout in cfg.layouts:
                if layout.cp_mode == "ulysses" and layout.cp > 1 and dims.num_heads % layout.cp:
                    rows.append({"model": model_name, "resolution": res, "layout": layout.name,
                                 "latent_frames": None, "video_frames": None,
                                 "note": f"{dims.num_heads} heads do not divide by Ulysses degree {layout.cp}"})
                    continue
                n = max_frames_estimate(dims, layout, hw, cfg.world_size, budget, precision)
                peak = estimate_peak(dims, layout, max(n, 1), hw, cfg.world_size, precision)
                rows.append({"model": model_name, "resolution": res, "layout": layout.name,
                             "latent_frames": n, "video_frames": video_frames(n) if n else 0,
                             "peak_gb_at_capacity": peak.peak / 2.0**30,
                             "model_state_gb": peak.model_state / 2.0**30})
    return rows


def format_measured_table(cfg: BenchConfig, capacities: dict[str, dict[str, Any]],
                          measurements: list[Measurement], budget: float) -> str:
    lines = [f"Measured on {cfg.world_size} ranks, budget {budget:g} MiB per rank "
             f"(peak = step peak above baseline + model state)",
             f"{'layout':<26}{'ac':>4}{'cp':>10}{'pair':>6}{'max frames':>12}{'video fr':>10}"
             f"{'peak MiB':>10}{'est MiB':>9}{'err':>8}{'step s':>8}"]
    for key, cap in capacities.items():
        layout = cap["layout"]
        at = [m for m in measurements if m.layout == layout["name"] and m.frames == cap["max_frames"]
              and [m.latent_h, m.latent_w] == cap["latent"]]
        m = at[0] if at else None
        cp = f"{layout['cp']}{'/' + layout['cp_mode'] if layout['cp'] > 1 else ''}"
        frames = f"{cap['max_frames']}{'+' if cap['capped'] else ''}" if cap["max_frames"] is not None else "n/a"
        vf = str(video_frames(cap["max_frames"])) if cap["max_frames"] else "-"
        lines.append(
            f"{key:<26}{'yes' if layout['ac'] else 'no':>4}{cp:>10}{layout['pair']:>6}{frames:>12}{vf:>10}"
            + (f"{m.peak_mb:>10.1f}{m.estimate_mb:>9.1f}{100 * m.error:>7.1f}%{m.step_s:>8.2f}" if m else
               f"{'-':>10}{'-':>9}{'-':>8}{'-':>8}  {cap.get('note', '')}")
        )
    return "\n".join(lines)


def format_estimate_table(cfg: EstimateConfig, rows: list[dict[str, Any]]) -> str:
    lines = [f"ESTIMATE (analytic, not measured): max frames per layout on {cfg.world_size} x "
             f"{cfg.budget_gb:.0f} GB, {cfg.precision} compute, fp32 master weights + AdamW",
             f"{'model':<18}{'res':>6}{'layout':>18}{'latent fr':>11}{'video fr':>10}{'peak GB':>9}"]
    for r in rows:
        if r["latent_frames"] is None:
            lines.append(f"{r['model']:<18}{r['resolution']:>6}{r['layout']:>18}{'n/a':>11}  {r['note']}")
            continue
        lines.append(f"{r['model']:<18}{r['resolution']:>6}{r['layout']:>18}{r['latent_frames']:>11}"
                     f"{r['video_frames']:>10}{r['peak_gb_at_capacity']:>9.1f}")
    return "\n".join(lines)


def plot_capacity(cfg: BenchConfig, measurements: list[Measurement], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    dims = cfg.model.dims()
    for i, layout in enumerate(cfg.layouts):
        points = sorted((m.frames, m.peak_mb, (m.latent_h, m.latent_w)) for m in measurements if m.layout == layout.name)
        if not points:
            continue
        color = f"C{i}"
        for j, hw in enumerate(sorted({p[2] for p in points})):
            xs = [p[0] for p in points if p[2] == hw]
            ys = [p[1] for p in points if p[2] == hw]
            ax.plot(xs, ys, "os^D"[j % 4] + "-", color=color, label=f"{layout.name} {hw[0]}x{hw[1]}")
            grid = list(range(1, max(xs) + 1))
            est_layout = estimated_layout(cfg, layout)
            est = [estimate_peak(dims, est_layout, f, hw, cfg.world_size).peak / MB for f in grid]
            ax.plot(grid, est, ":", color=color, alpha=0.6)
    ax.axhline(budget, color="k", linestyle="--", label=f"budget {budget:g} MiB")
    ax.set_xlabel("latent frames")
    ax.set_ylabel("per-rank peak memory (MiB)")
    ax.set_title(f"Reg-DPO step, tiny Wan T2V, {cfg.world_size} ranks (dotted: estimator)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the run ----------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, search: SearchConfig, out: Path, budget: float,
              previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    dims = cfg.model.dims()
    layouts = [lay for lay in cfg.layouts if not search.layouts or lay.name in search.layouts]
    measurements: list[Measurement] = []
    capacities: dict[str, dict[str, Any]] = {}
    primary = tuple(search.latent_sizes[0])
    for hw_list in search.latent_sizes:
        hw = (int(hw_list[0]), int(hw_list[1]))
        for layout in layouts:
            key = layout.name if hw == primary else f"{layout.name}@{hw[0]}x{hw[1]}"
            if cfg.world_size % layout.ranks_needed():
                capacities[key] = {"layout": asdict(layout), "latent": list(hw), "max_frames": None,
                                   "capped": False, "note": f"needs cp*pair | {cfg.world_size} ranks"}
                continue
            guess = max_frames_estimate(dims, estimated_layout(cfg, layout), hw, cfg.world_size,
                                        budget * MB, limit=search.max_frames)

            def peak_at(frames: int, layout: Layout = layout, hw: tuple[int, int] = hw) -> float:
                for _attempt in range(MEASURE_ATTEMPTS):  # again while pages were evicted
                    m = measure(cfg, layout, frames, hw)
                    if not m.major_faults:
                        break
                measurements.append(m)
                print(f"  {layout.name:<18} {hw[0]}x{hw[1]} frames {frames:>3}: peak {m.peak_mb:8.1f} MiB "
                      f"(ranks {', '.join(f'{p:.1f}' for p in m.peak_mb_per_rank)}), estimate "
                      f"{m.estimate_mb:8.1f} ({100 * m.error:+.1f}%), step {m.step_s:.2f} s"
                      + (f"  UNRELIABLE: {m.major_faults} major page faults (the machine is short of memory)"
                         if m.major_faults else ""), flush=True)
                return m.peak_mb

            try:
                for fraction in search.sweep_fractions:
                    peak_at(min(max(1, round(fraction * guess)), search.max_frames))
                cap = find_capacity(peak_at, budget, max(guess, 1), search.max_frames)
            except NotImplementedError as err:  # a layout whose pieces are not in the tree yet
                capacities[key] = {"layout": asdict(layout), "latent": list(hw), "max_frames": None,
                                   "capped": False, "note": str(err)}
                continue
            except RuntimeError as err:
                if "NotImplementedError" not in str(err):
                    raise
                note = str(err).strip().splitlines()[-1]
                capacities[key] = {"layout": asdict(layout), "latent": list(hw), "max_frames": None,
                                   "capped": False, "note": note}
                print(f"  {layout.name:<18} skipped: {note}", flush=True)
                continue
            capacities[key] = {"layout": asdict(layout), "latent": list(hw), "max_frames": cap.max_frames,
                               "video_frames": video_frames(cap.max_frames) if cap.max_frames else 0,
                               "capped": cap.capped, "estimated_max_frames": guess}
    base = capacities.get(cfg.baseline, {}).get("max_frames")
    comb = capacities.get(cfg.combined, {}).get("max_frames")
    ratio = comb / base if base and comb is not None else None
    ac_base = capacities.get(cfg.ac_baseline, {}).get("max_frames")
    ratio_vs_ac = comb / ac_base if ac_base and comb is not None else None
    result: dict[str, Any] = {
        "world_size": cfg.world_size,
        "budget_mb": budget,
        "method": measurements[0].method if measurements else None,
        "peak_definition": "per rank: step peak above the baseline right before the step "
                           "(CPU: VmHWM - VmRSS after malloc_trim + clear_refs; CUDA: max_allocated - allocated) "
                           "plus resident model state (local param shards of policy and reference, AdamW moments)",
        "measurements": [asdict(m) for m in measurements],
        "capacities": capacities,
        "capacity_ratio": ratio,
        "capacity_ratio_of": f"{cfg.combined} / {cfg.baseline}",
        "capacity_ratio_vs_ac": ratio_vs_ac,
        "capacity_ratio_vs_ac_of": f"{cfg.combined} / {cfg.ac_baseline}",
        "estimator_error": estimator_error(measurements),
        "estimate_real_models": estimate_table(cfg.estimate),
        "wall_time_s": None,
    }
    if previous is not None:
        result["repeatability"] = repeatability(measurements, previous)
    print()
    print(format_measured_table(cfg, capacities, measurements, budget))
    print(f"capacity_ratio ({cfg.combined} / {cfg.baseline}): "
          f"{'n/a' if ratio is None else f'{ratio:.2f}'}")
    print(f"capacity_ratio_vs_ac ({cfg.combined} / {cfg.ac_baseline}): "
          f"{'n/a' if ratio_vs_ac is None else f'{ratio_vs_ac:.2f}'}")
    err = result["estimator_error"]
    print(f"estimator error on {err['count']} measurements: mean {100 * err['mean_abs_rel_error']:.1f}%, "
          f"max {100 * err['max_abs_rel_error']:.1f}%")
    if previous is not None:
        rep = result["repeatability"]
        print(f"repeatability vs previous run: {rep['compared']} common points, max difference "
              f"{100 * rep['max_rel_diff']:.2f}%")
    print()
    print(format_estimate_table(cfg.estimate, result["estimate_real_models"]))
    plot_capacity(cfg, measurements, budget, out / "capacity.png")
    result["wall_time_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'results.json'} and {out / 'capacity.png'} in {result['wall_time_s']:.0f} s")
    return result


def check_config(cfg: BenchConfig, source: str) -> None:
    """Reject a config the benchmark cannot run, naming the key."""
    from common.errors import ConfigError

    names = [layout.name for layout in cfg.layouts]
    for key in ("baseline", "combined"):
        if getattr(cfg, key) not in names:
            raise ConfigError(f"{source}: '{key}' is {getattr(cfg, key)!r}, not one of the layouts {names}")
    world4 = [layout.name for layout in cfg.world4.layouts]
    for key in ("baseline", "combined", "ac_baseline"):
        if getattr(cfg.world4, key) not in world4:
            raise ConfigError(f"{source}: 'world4.{key}' is {getattr(cfg.world4, key)!r}, "
                              f"not one of the world4 layouts {world4}")
    for layout in cfg.layouts + cfg.estimate.layouts + cfg.world4.layouts:
        if layout.pair not in (1, 2) or layout.cp < 1 or layout.cp_mode not in ("ulysses", "ring"):
            raise ConfigError(f"{source}: layout {layout.name!r} needs pair 1 or 2, cp >= 1 and cp_mode "
                              f"ulysses or ring, got pair={layout.pair}, cp={layout.cp}, cp_mode={layout.cp_mode!r}")


def main(argv: list[str] | None = None) -> int:
    from common.config import load_config, save_config
    from common.errors import UserError

    parser = argparse.ArgumentParser(prog="memory_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="bench YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set quick.budget_mb=128")
    parser.add_argument("--out", default="runs/memory_bench", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the config's quick search (< 10 min on 2 CPU cores)")
    parser.add_argument("--world", type=int, default=None,
                        help="ranks: the config's own (2) or 4 (its 'world4' layouts and search; "
                             "combined = AC + pair 2 + cp 2)")
    parser.add_argument("--budget", type=float, default=None, help="per-rank budget in MiB (default: config)")
    parser.add_argument("--compare", default=None, help="results.json of an earlier run: report repeatability")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(BenchConfig, args.config, args.overrides)
        check_config(cfg, args.config)
        search = cfg.quick if args.quick else cfg.full
        cfg, world_search = on_world(cfg, args.world or cfg.world_size)
        search = world_search or search
        budget = args.budget if args.budget is not None else search.budget_mb
        previous = None
        if args.compare:
            path = Path(args.compare)
            if not path.is_file():
                raise UserError(f"--compare {path}: file not found")
            previous = json.loads(path.read_text())["measurements"]
    except UserError as err:
        print(f"memory_bench: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    save_config(cfg, out)
    result = run_bench(cfg, search, out, budget, previous)
    ratio = result["capacity_ratio"]
    return 0 if ratio is not None and math.isfinite(ratio) else 1


if __name__ == "__main__":
    # Run through the importable module, so that the forked measurement processes find
    # the same functions under the same name (`tools.memory_bench`).
    from tools.memory_bench import main as bench_main

    sys.exit(bench_main())
