"""One GPU, one call: Wan2.1-T2V-1.3B Reg-DPO steps at 480p x 81 frames, LoRA and full.

Builds the real Wan2.1-T2V-1.3B transformer (`tools.scale_bench.WAN21_T2V_1_3B`, 30
layers, width 1536) with random init in bf16 on the GPU, and runs `videodpo.trainer`'s
Reg-DPO step with activation checkpointing on one preference pair of 21 latent frames
(81 video frames) at 480p (60x104 latent, 32,760 tokens per video): first with LoRA
(rank 16 on the attention projections, reference = adapters disabled), then full
fine-tuning (frozen bf16 reference copy, AdamW). For each it prints seconds per step
(median of `--steps` after one warm-up), peak memory (`torch.cuda.max_memory_allocated`)
and MFU against `--peak-tflops` (model FLOPs of `tools.scale_bench.step_flops`; the
recomputation of checkpointing is not counted). Expected well under 8 minutes on an
H100/H200.

`--dry-run` runs the same code on a tiny-width model and clip (on the CPU where there is
no GPU), so the logic is tested without a GPU.

    python tools/gpu_video_bench.py --out runs/gpu_bench --peak-tflops 989
    python tools/gpu_video_bench.py --dry-run --out /tmp/gpu_dry
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/gpu_video_bench.py`
    sys.path.insert(0, str(ROOT))

from tools.scale_bench import LAYOUTS, WAN21_T2V_1_3B, RealModel, cuda_step_report  # noqa: E402

VIDEO_FRAMES = 81
LATENT_FRAMES = 21  # Wan's VAE: (81 - 1) / 4 + 1


def dry_run_model() -> RealModel:
    """Wan2.1-T2V-1.3B's structure at tiny width and depth (the dry run's model)."""
    cfg = dict(WAN21_T2V_1_3B.config, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32,
               freq_dim=32, num_layers=2)
    return replace(WAN21_T2V_1_3B, name="Wan-T2V-tiny", config=cfg, text_len=16, latents={"480p": (8, 12)})


def run(out: Path, peak_tflops: float, steps: int, dry_run: bool) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    model = dry_run_model() if dry_run else WAN21_T2V_1_3B
    frames = 3 if dry_run else LATENT_FRAMES
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_video_bench: no CUDA device; use --dry-run to check the logic on the CPU")
    reports = []
    for lora in (True, False):
        reports.append(cuda_step_report(model, "480p", frames, LAYOUTS["ac"], peak_tflops, steps=steps, lora=lora))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = {"reports": reports, "dry_run": dry_run, "video_frames": VIDEO_FRAMES if not dry_run else None,
              "peak_tflops": peak_tflops, "torch": torch.__version__, "wall_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'mode':<6}{'tokens':>8}{'step s':>9}{'peak GB':>9}{'TFLOP/step':>12}{'TFLOP/s':>9}{'MFU':>7}  device"]
    for r in result["reports"]:
        lines.append(f"{'LoRA' if r['lora'] else 'full':<6}{r['tokens']:>8}{r['step_s']:>9.2f}{r['peak_memory_gb']:>9.2f}"
                     f"{r['step_tflops']:>12.2f}{r['achieved_tflops_per_gpu']:>9.1f}{100 * r['mfu']:>6.1f}%  {r['device']}")
    lines.append(f"wall {result['wall_s']:.0f} s{' (dry run: tiny model)' if result['dry_run'] else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_video_bench", help="directory for gpu_results.json")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989; A100: 312)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode after one warm-up")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and clip: check the logic anywhere")
    args = parser.parse_args(argv)
    run(Path(args.out), args.peak_tflops, args.steps, args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
