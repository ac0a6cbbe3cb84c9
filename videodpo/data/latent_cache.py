"""The latent cache on disk: what `videodpo precompute` writes, read back without encoders.

A cache folder holds safetensors shards of encoded pairs (latents of both clips, the
caption's and for I2V the first frame's conditions), a JSON list of rows per shard,
`index.json`, and `producer.json`: a fingerprint of the model folder's encoder files
(everything but the transformer and scheduler) and the clip settings. `LatentCache(dir,
expect_model=...)` reads it (`videodpo.data.dataset.CachedPairDataset` wraps it for
training) and refuses a cache made by another model. Writing is in `videodpo.precompute`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import ConfigError, DataError

INDEX_FILE = "index.json"
PRODUCER_FILE = "producer.json"
CACHE_FORMAT = 1
# Folders of a pipeline directory that do not change what the cache holds.
NOT_FINGERPRINTED = ("transformer", "transformer_2", "scheduler")
_SAMPLE_BYTES = 1 << 20



def _file_digest(path: Path) -> str:
    """sha256 of small files; of size plus first, middle and last MiB of large ones
    (weights of real encoders are many GB; any fine-tune changes every sample)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        if size <= 3 * _SAMPLE_BYTES:
            h.update(fh.read())
        else:
            for offset in (0, size // 2, size - _SAMPLE_BYTES):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """A digest of every file in `model_dir` except the transformer and scheduler."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model '{model_dir}': not a directory")
    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir)
        if rel.parts[0] in NOT_FINGERPRINTED or rel.name.startswith("."):
            continue
        h.update(f"{rel.as_posix()}:{_file_digest(path)}\n".encode())
    return h.hexdigest()


class LatentCache:
    """Read side of the cache. `cache[i]` gives `chosen`, `rejected` latents
    (C, f, h, w), the conditions (`text`, and for I2V `image_latents`, maybe
    `image_embeds`) without batch dimension, plus `caption`, `row` and `meta`.
    `expect_model` (a model directory or a fingerprint string) must match the producer."""

    def __init__(self, root: str | Path, expect_model: str | Path | None = None) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise DataError(
                f"{self.root}: not a latent cache (no {INDEX_FILE}); run `videodpo precompute`"
            )
        index = json.loads(index_path.read_text())
        if index.get("format") != CACHE_FORMAT:
            raise DataError(
                f"{index_path}: cache format {index.get('format')}, expected {CACHE_FORMAT}"
            )
        self.producer: dict = index["producer"]
        self.settings: dict = index["settings"]
        self.entries: list[dict] = index["entries"]
        if expect_model is not None:
            self.check_model(expect_model)
        self._open: tuple[str, dict[str, torch.Tensor]] | None = None

    def check_model(self, expect_model: str | Path) -> None:
        candidate = Path(expect_model)
        expected = model_fingerprint(candidate) if candidate.is_dir() else str(expect_model)
        if expected != self.producer["fingerprint"]:
            raise DataError(
                f"{self.root}: latent cache was made by model {self.producer['model']} "
                f"(fingerprint {self.producer['fingerprint'][:12]}), which does not match "
                f"{expect_model} (fingerprint {expected[:12]}); rebuild it with `videodpo precompute`"
            )

    def __len__(self) -> int:
        return len(self.entries)

    def _shard(self, name: str) -> dict[str, torch.Tensor]:
        if self._open is None or self._open[0] != name:
            path = self.root / name
            try:
                with safe_open(str(path), framework="pt") as f:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as err:  # noqa: BLE001 - a missing or damaged shard is a data error
                raise DataError(f"{path}: cannot read cache shard: {err}") from None
            self._open = (name, tensors)
        return self._open[1]

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        tensors = self._shard(entry["shard"])
        prefix = f"{entry['key']}."
        item = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if "chosen" not in item or "rejected" not in item:
            raise DataError(
                f"{self.root / entry['shard']}: row {entry['row']} is missing from the shard"
            )
        text = item.get("text")
        if text is not None and text.shape[0] < entry.get("text_length", 0):
            pad = text.new_zeros(entry["text_length"] - text.shape[0], *text.shape[1:])
            item["text"] = torch.cat([text, pad])
        item.update(caption=entry["caption"], row=entry["row"], meta=entry.get("meta", {}))
        return item
