"""`videodpo build-pairs`: GT-Pairs from real clips and a base video model.

For every row of a clip manifest the base pipeline (diffusers Wan2.1 or CogVideoX, T2V
or I2V, loaded with `from_pretrained` from a local directory) generates a clip with the
real clip's frame count and resolution, from the caption (T2V) or the first frame and
the caption (I2V), seeded by `seed + row`. The real clip is preferred, the generation
rejected. Rows are split over data-parallel ranks (torchrun); each rank appends finished
rows to its own journal, so an interrupted run resumes where it stopped; rank 0 merges
the journals into `out_dir/pairs.jsonl` and prints rows generated / skipped / failed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import diffusers
import torch

from common.config import add_config_args, config_from_args, save_config
from common.distributed import (
    init_distributed,
    rank_share,
)
from common.errors import DataError
from common.fsdp import to_dtype
from videodpo.config import BuildPairsConfig
from videodpo.data.manifest import (
    ManifestRow,
    append_manifest_row,
    check_fields,
    read_manifest,
    read_manifest_rows,
    resolve_path,
    write_manifest,
)
from videodpo.data.video_io import (
    load_clip,
    load_image,
    probe_video,
    to_pil_image,
    write_video,
)
from videodpo.models.registry import PIPELINE_CLASSES, PIPELINES, read_pipeline_index, resolve_task
from videodpo.row_jobs import RowCounts, check_job_config, finish_rows, work_rows

HELP = "build a GT-Pair manifest: real clip preferred, base-model generation rejected"
logger = logging.getLogger(__name__)
PAIRS_FILE = "pairs.jsonl"
JOURNAL_DIR = "journal"


def load_pipeline(model_dir: str | Path, dtype: torch.dtype, task: str = "auto"):
    """A diffusers video pipeline from a local directory, and its task (t2v / i2v).

    A Wan2.2 TI2V folder serves both tasks (`videodpo.models.registry.resolve_task`):
    asked for the other one than its class's (`task: i2v` on the `WanPipeline` folder that
    Wan2.2-TI2V-5B-Diffusers is), the same weights load as that task's pipeline class."""
    model_dir = Path(model_dir)
    _, config = read_pipeline_index(model_dir)
    class_name = config["_class_name"]
    family, saved = PIPELINES[class_name]
    found = resolve_task(config, task, "config key 'task'", model_dir)
    extra = {}
    if found != saved:
        class_name = PIPELINE_CLASSES[(family, found)]
        extra = {"expand_timesteps": True}
        if found == "i2v":  # TI2V conditions on the first frame's latent, no CLIP image encoder
            extra.update(image_encoder=None, image_processor=None)
    pipe = getattr(diffusers, class_name).from_pretrained(model_dir, dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe, found


def shape_multiples(pipe) -> tuple[int, int]:
    """(frame step, pixel multiple): frames must be k * step + 1, sizes multiples."""
    patch = pipe.transformer.config.patch_size
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    return int(pipe.vae_scale_factor_temporal), int(pipe.vae_scale_factor_spatial) * int(patch)


def _check_shape(clip: torch.Tensor, pipe) -> None:
    step, multiple = shape_multiples(pipe)
    frames, height, width = clip.shape[1:]
    if (frames - 1) % step or height % multiple or width % multiple:
        raise DataError(
            f"clip is {frames} frames of {height}x{width}; this model needs {step}k+1 frames "
            f"and sizes that are multiples of {multiple} (set num_frames / height / width)"
        )


def generate_clip(
    pipe,
    task: str,
    caption: str,
    image: torch.Tensor | None,
    shape: tuple[int, int, int],
    seed: int,
    cfg: BuildPairsConfig,
) -> torch.Tensor:
    """One generation as float (3, F, H, W) in [-1, 1]."""
    frames, height, width = shape
    kwargs = dict(
        prompt=caption,
        negative_prompt=cfg.negative_prompt or None,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        max_sequence_length=cfg.max_sequence_length,
    )
    if task == "i2v":
        kwargs["image"] = to_pil_image(image)
    with torch.no_grad():
        out = pipe(**kwargs).frames  # (B, F, H, W, C) in [0, 1]
    video = torch.as_tensor(out[0]).float()
    return video.permute(3, 0, 1, 2) * 2 - 1


def _done_rows(journal_dir: Path) -> set[int]:
    done: set[int] = set()
    for part in sorted(journal_dir.glob("rank*.jsonl")):
        for row in read_manifest_rows(part, strict=False):
            source_row = (row.data.get("meta") or {}).get("source_row")
            if source_row is not None:  # a line cut by a crash is simply redone
                done.add(int(source_row))
    return done


def _condition_image(row: ManifestRow, root: Path, clip: torch.Tensor) -> torch.Tensor:
    """The row's `image` fitted to the clip, or else the clip's first frame."""
    value = row.data.get("image")
    if not value:
        return clip[:, 0]
    return load_image(resolve_path(root, value), clip.shape[-2], clip.shape[-1])


def build_pair(
    pipe, task: str, row: ManifestRow, root: Path, out_dir: Path, cfg: BuildPairsConfig
) -> dict:
    """Generate the rejected clip of one row; returns its pair row (absolute paths)."""
    check_fields(row, "clip")
    caption = row.data["caption"]
    source = resolve_path(root, row.data["video"])
    info = probe_video(source)
    clip = load_clip(source, num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)
    _check_shape(clip, pipe)
    name = f"{row.index:06d}.mp4"
    fps = float(row.data.get("fps") or info.fps or 8.0)
    chosen = source
    if tuple(clip.shape[1:]) != (info.num_frames, info.height, info.width):
        chosen = write_video(out_dir / "chosen" / name, clip, fps=fps)  # the clip as trained on
    image = _condition_image(row, root, clip) if task == "i2v" else None
    seed = cfg.seed + row.index
    generated = generate_clip(pipe, task, caption, image, tuple(clip.shape[1:]), seed, cfg)
    if generated.shape != clip.shape:
        raise DataError(
            f"the pipeline returned {tuple(generated.shape)}, expected {tuple(clip.shape)}"
        )
    rejected = write_video(out_dir / "generated" / name, generated, fps=fps)
    pair = {
        "chosen": str(chosen),
        "rejected": str(rejected),
        "caption": caption,
        "meta": {
            "generator": Path(cfg.model).name,
            "model": str(Path(cfg.model).resolve()),
            "task": task,
            "seed": seed,
            "steps": cfg.num_inference_steps,
            "guidance": cfg.guidance_scale,
            "source_row": row.index,
        },
    }
    if row.data.get("image"):
        pair["image"] = str(resolve_path(root, row.data["image"]))
    return pair


def merge_journals(out_dir: Path) -> Path:
    """All ranks' finished rows, in source order, as `out_dir/pairs.jsonl`."""
    rows: dict[int, dict] = {}
    for part in sorted((out_dir / JOURNAL_DIR).glob("rank*.jsonl")):
        for row in read_manifest(part):
            rows[int(row["meta"]["source_row"])] = row
    return write_manifest(out_dir / PAIRS_FILE, [rows[k] for k in sorted(rows)])


def build_gt_pairs(cfg: BuildPairsConfig) -> RowCounts:
    """Build (or finish) the pair manifest; returns the summary over all ranks."""
    check_job_config(cfg, "build-pairs")
    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    out_dir = Path(cfg.out_dir)
    journal_dir = out_dir / JOURNAL_DIR
    journal_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, out_dir)
    manifest = Path(cfg.manifest)
    rows = read_manifest_rows(manifest, strict=False)[: cfg.limit]
    done = _done_rows(journal_dir)
    mine = rank_share(rows, rank, world)
    pipe, task = load_pipeline(cfg.model, to_dtype(cfg.dtype), cfg.task)
    if cfg.offload_encoders and dist_info.device.type == "cuda":
        pipe.enable_model_cpu_offload(device=dist_info.device)  # VAE / encoders move in when used
    else:
        pipe.to(dist_info.device)  # VAE, text and image encoders with the transformer
    journal = journal_dir / f"rank{rank}.jsonl"
    todo = [row for row in mine if row.index not in done]

    def build(row: ManifestRow) -> None:
        append_manifest_row(journal, build_pair(pipe, task, row, manifest.parent, out_dir, cfg))

    generated, failed = work_rows(todo, build, manifest, "build-pairs")
    return finish_rows(RowCounts(generated, len(mine) - len(todo), failed), lambda: merge_journals(out_dir))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(BuildPairsConfig, args)
    return build_gt_pairs(cfg).report("build-pairs", "generated", f"manifest: {Path(cfg.out_dir) / PAIRS_FILE}")
