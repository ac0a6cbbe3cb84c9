"""`videodpo precompute`: what training needs from a pair manifest, encoded once.

`videodpo precompute --config CFG` encodes both clips of every pair with the model's VAE
and the caption (and for I2V the first frame) into the adapter's conditions, and writes
them as safetensors shards, each with a small JSON list of its rows, plus `index.json`.
Training reads it with `LatentCache` (or `videodpo.data.dataset.CachedPairDataset`)
without loading the VAE or any encoder. The cache records what produced it: a
fingerprint of the model folder's encoder files (everything but the transformer and
scheduler) and the clip settings; `LatentCache(dir, expect_model=...)` refuses a cache
made by another model, and precompute refuses to add to one. Rows are split over
data-parallel ranks; shards already written are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.config import add_config_args, config_from_args, save_config
from common.distributed import (
    barrier,
    init_distributed,
    rank_share,
)
from common.errors import DataError
from common.fsdp import to_dtype
from common.io import atomic_path, write_text_atomic
from videodpo.config import PrecomputeConfig
from videodpo.data.dataset import load_pair_clips
from videodpo.data.latent_cache import CACHE_FORMAT, INDEX_FILE, PRODUCER_FILE, model_fingerprint
from videodpo.data.manifest import ManifestRow, pair_fields, read_manifest_rows
from videodpo.data.video_io import load_image
from videodpo.models import load_adapter
from videodpo.row_jobs import RowCounts, check_job_config, finish_rows, work_rows

HELP = "encode a pair manifest into a latent cache (VAE latents + conditions)"
logger = logging.getLogger(__name__)
def encode_pair(
    adapter, row: ManifestRow, root: Path, cfg: PrecomputeConfig
) -> dict[str, torch.Tensor]:
    """Latents and conditions of one pair row (batch dimension dropped)."""
    pair = pair_fields(row, root)
    chosen, rejected = load_pair_clips(pair, num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)
    clips = {"chosen": chosen, "rejected": rejected}
    first = None
    if adapter.task == "i2v":
        first = (load_image(pair.image, chosen.shape[-2], chosen.shape[-1])
                 if pair.image is not None else chosen[:, 0])
        first = first[None].to(adapter.encoder_device)
    with torch.no_grad(), adapter.encoders_on_device():
        out = adapter.prepare_conditions([pair.caption], first, chosen.shape[1])
        for key, clip in clips.items():
            out[key] = adapter.encode_video(clip[None].to(adapter.encoder_device))
    return {k: v[0].cpu().contiguous() for k, v in out.items()}


def _trim_zero_rows(text: torch.Tensor) -> torch.Tensor:
    """Text embeddings without their trailing all-zero padding rows (Wan pads prompts
    to 512 tokens with exact zeros); `LatentCache` pads them back on reading."""
    nonzero = text.reshape(text.shape[0], -1).ne(0).any(dim=1).nonzero()
    return text[: int(nonzero.max()) + 1 if len(nonzero) else 1].contiguous()


def _existing_shards(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("shard-*.json"))]


def _write_shard(out_dir: Path, name: str, tensors: dict, entries: list[dict]) -> None:
    with atomic_path(out_dir / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    # The shard counts once its sidecar exists.
    write_text_atomic(out_dir / f"{name}.json", json.dumps({"shard": f"{name}.safetensors", "entries": entries}))


def _claim_producer(out_dir: Path, producer: dict, settings: dict) -> None:
    path = out_dir / PRODUCER_FILE
    record = {"producer": producer, "settings": settings}
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            raise DataError(
                f"{out_dir}: holds a cache made by {old['producer']['model']} with settings "
                f"{old['settings']}; it does not match this run; choose another out_dir"
            )
        return
    path.write_text(json.dumps(record, indent=2))


def precompute(cfg: PrecomputeConfig) -> RowCounts:
    """Encode the pair manifest into `cfg.out_dir`; returns counts over all ranks."""
    check_job_config(cfg, "precompute")
    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    producer = {
        "model": str(Path(cfg.model).resolve()),
        "fingerprint": model_fingerprint(cfg.model),
    }
    settings = {
        k: v
        for k, v in asdict(cfg).items()
        if k in ("num_frames", "height", "width", "cache_dtype")
    }
    if rank == 0:
        save_config(cfg, out_dir)
        _claim_producer(out_dir, producer, settings)
    barrier()
    _claim_producer(out_dir, producer, settings)  # every rank checks before working
    manifest = Path(cfg.manifest)
    rows = read_manifest_rows(manifest, strict=False)
    done = {e["row"] for s in _existing_shards(out_dir) for e in s["entries"]}
    mine = rank_share(rows, rank, world)
    todo = [r for r in mine if r.index not in done]
    # Encoders on this rank's device; the transformer is only its config (meta device).
    adapter = load_adapter(cfg.model, dtype=to_dtype(cfg.dtype), transformer_weights=False)
    adapter.place_encoders(dist_info.device, offload=cfg.offload_encoders)
    producer.update(family=adapter.family, task=adapter.task)
    store = to_dtype(cfg.cache_dtype)
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict] = []
    shard_id = len(list(out_dir.glob(f"shard-r{rank}-*.json")))

    def flush() -> None:
        nonlocal shard_id, tensors, entries
        if entries:
            _write_shard(out_dir, f"shard-r{rank}-{shard_id:05d}", tensors, entries)
            shard_id, tensors, entries = shard_id + 1, {}, []

    def encode(row: ManifestRow) -> None:
        encoded = encode_pair(adapter, row, manifest.parent, cfg)
        key = f"r{row.index:08d}"
        entry = {"row": row.index, "key": key, "caption": row.data["caption"]}
        entry["meta"] = row.data.get("meta") or {}
        if "text" in encoded:
            entry["text_length"] = encoded["text"].shape[0]
            encoded["text"] = _trim_zero_rows(encoded["text"])
        tensors.update({f"{key}.{name}": t.to(store) for name, t in encoded.items()})
        entries.append(entry)
        if len(entries) >= cfg.rows_per_shard:
            flush()

    n_encoded, failed = work_rows(todo, encode, manifest, "precompute")
    flush()
    return finish_rows(RowCounts(n_encoded, len(mine) - len(todo), failed),
                       lambda: write_index(out_dir, producer, settings))


def write_index(out_dir: Path, producer: dict, settings: dict) -> Path:
    """Merge the shards' row lists into `index.json`, entries in manifest order."""
    entries = [dict(e, shard=s["shard"]) for s in _existing_shards(out_dir) for e in s["entries"]]
    entries.sort(key=lambda e: e["row"])
    index = {"format": CACHE_FORMAT, "producer": producer, "settings": settings, "entries": entries}
    path = out_dir / INDEX_FILE
    return write_text_atomic(path, json.dumps(index, indent=1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(PrecomputeConfig, args)
    return precompute(cfg).report("precompute", "encoded", f"cache: {Path(cfg.out_dir) / INDEX_FILE}")
