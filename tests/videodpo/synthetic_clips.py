"""A synthetic-world clip folder on disk for tests: mp4 clips and their manifest."""

from __future__ import annotations

from pathlib import Path

from videodpo.data.manifest import write_manifest
from videodpo.data.synthetic import WorldConfig, caption, render_clip, sample_records
from videodpo.data.video_io import write_video


def write_dataset(out_dir: str | Path, world: WorldConfig, num_clips: int, seed: int) -> Path:
    """Write `num_clips` clips as mp4 under `out_dir/clips/` and a JSONL manifest
    `out_dir/manifest.jsonl` whose rows also carry the record under "world"."""
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, record in enumerate(sample_records(world, num_clips, seed)):
        rel = f"clips/{i:06d}.mp4"
        write_video(out_dir / rel, render_clip(record), fps=world.fps)
        rows.append(
            {
                "video": rel,
                "caption": caption(record),
                "fps": world.fps,
                "num_frames": record.num_frames,
                "world": record.to_dict(),
            }
        )
    return write_manifest(out_dir / "manifest.jsonl", rows)
