"""Training-time datasets of preference pairs, from a pair manifest or a latent cache.

A bad row (a missing or undecodable file, an empty caption, two clips of different
shapes, a damaged cache shard) is skipped: logged once, counted, and replaced by the
next good row, so every batch stays full and every data-parallel rank sees the same
number of samples. When more than `max_bad_fraction` of all rows turn out bad, a
`DataError` stops training with the count and the first reasons.

Indexing a dataset replaces a bad row by the next good one and counts it in that
process. The training loader (`videodpo.data.loader.PairLoader`) reads rows in worker
processes with `read_row` instead, which never replaces a row: the worker sends the
reason back and the main process keeps the one count (`BadRows.mark`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from common.errors import DataError
from videodpo.config import MAX_BAD_ROW_FRACTION
from videodpo.data.latent_cache import LatentCache
from videodpo.data.manifest import ManifestRow, PairFields, pair_fields, read_manifest_rows
from videodpo.data.video_io import load_clip, load_image

logger = logging.getLogger(__name__)


class BadRows:
    """Skip-and-count bookkeeping: each bad row is logged once; too many raise."""

    def __init__(self, source: str, total: int, max_bad_fraction: float) -> None:
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.source, self.total, self.max_bad_fraction = source, total, max_bad_fraction
        self.reasons: dict[int, str] = {}

    @property
    def count(self) -> int:
        return len(self.reasons)

    def mark(self, row: int, reason: str) -> None:
        if row in self.reasons:
            return
        self.reasons[row] = reason
        logger.warning("%s: skipping row %d: %s", self.source, row, reason)
        if self.count > self.max_bad_fraction * self.total:
            first = "; ".join(f"row {r}: {m}" for r, m in list(self.reasons.items())[:3])
            raise DataError(
                f"{self.source}: {self.count} of {self.total} rows are bad, more than the allowed "
                f"share {self.max_bad_fraction:g} (first: {first}); run `videodpo check-data`"
            )


class _SkippingDataset(Dataset):
    """Index i gives row i, or the next good row after it when row i is bad."""

    bad: BadRows

    def __len__(self) -> int:
        return self.bad.total

    def load(self, index: int) -> dict:
        raise NotImplementedError

    def row_number(self, index: int) -> int:
        return index

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        for offset in range(n):
            i = (index + offset) % n
            if self.row_number(i) in self.bad.reasons:
                continue
            try:
                return self.load(i)
            except DataError as err:
                self.bad.mark(self.row_number(i), str(err))
        raise DataError(f"{self.bad.source}: no good rows left")


def load_pair_clips(pair: PairFields, **clip_args) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and rejected clips of a pair, sampled alike (`load_clip`'s arguments);
    clips of different shapes are a DataError."""
    chosen = load_clip(pair.chosen, **clip_args)
    rejected = load_clip(pair.rejected, **clip_args)
    if chosen.shape != rejected.shape:
        raise DataError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in shape")
    return chosen, rejected


class PairDataset(_SkippingDataset):
    """Pairs from a manifest (`chosen`, `rejected`, `caption`, optional `image`).

    Items: `chosen` and `rejected` float (3, F, H, W) in [-1, 1], `caption`, `row` (the
    manifest line), `meta`, and with `with_first_frame` a `first_frame` (3, H, W): the
    row's `image` when it has one, else the chosen clip's first frame. Clips are sampled
    (`num_frames`, `stride`, `fps`) and resized and center-cropped to `height` x `width`.
    """

    def __init__(
        self,
        manifest: str | Path,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        stride: int = 1,
        fps: float | None = None,
        with_first_frame: bool = False,
        max_bad_fraction: float = MAX_BAD_ROW_FRACTION,
        reader: str = "auto",
    ) -> None:
        self.manifest = Path(manifest)
        self.root = self.manifest.parent
        self.rows: list[ManifestRow] = read_manifest_rows(self.manifest, strict=False)
        if not self.rows:
            raise DataError(f"{self.manifest}: manifest has no rows")
        self.clip_args = dict(
            num_frames=num_frames, stride=stride, fps=fps, height=height, width=width, reader=reader
        )
        self.with_first_frame = with_first_frame
        self.bad = BadRows(str(self.manifest), len(self.rows), max_bad_fraction)

    def row_number(self, index: int) -> int:
        return self.rows[index].index

    def load(self, index: int) -> dict:
        row = self.rows[index]
        pair = pair_fields(row, self.root)
        chosen, rejected = load_pair_clips(pair, **self.clip_args)
        item = {
            "chosen": chosen,
            "rejected": rejected,
            "caption": pair.caption,
            "row": row.index,
            "meta": pair.meta,
        }
        if self.with_first_frame:
            item["first_frame"] = (chosen[:, 0] if pair.image is None
                                   else load_image(pair.image, chosen.shape[-2], chosen.shape[-1]))
        return item


class CachedPairDataset(_SkippingDataset):
    """Pairs from a latent cache (see `videodpo.data.latent_cache`): no VAE, no text
    encoder. Items: `chosen`, `rejected` latents (C, f, h, w), the cached conditions
    (`text`, and for I2V `image_latents`, optionally `image_embeds`) without the batch
    dimension, `caption`, `row` and `meta`. `expect_model` (a model directory or a
    fingerprint) makes a cache built from another model an error."""

    def __init__(
        self,
        cache_dir: str | Path,
        expect_model: str | Path | None = None,
        max_bad_fraction: float = MAX_BAD_ROW_FRACTION,
    ) -> None:
        self.cache = LatentCache(cache_dir, expect_model=expect_model)
        self.bad = BadRows(str(self.cache.root), len(self.cache), max_bad_fraction)

    def row_number(self, index: int) -> int:
        return self.cache.entries[index]["row"]

    def load(self, index: int) -> dict:
        return self.cache[index]


def read_row(dataset: Dataset, index: int) -> tuple[dict | None, tuple[int, str] | None]:
    """Row `index` as `(item, None)`, or `(None, (row number, reason))` when it is bad.

    A `videodpo.data` dataset is read without its skip-and-replace; any other map-style
    dataset is indexed and a `DataError` it raises marks the row bad (row = index + 1).
    """
    if isinstance(dataset, _SkippingDataset):
        try:
            return dataset.load(index), None
        except DataError as err:
            return None, (dataset.row_number(index), str(err))
    try:
        return dataset[index], None
    except DataError as err:
        return None, (index + 1, str(err))


def collate_pairs(items: list[dict]) -> dict:
    """Stack tensors along a new batch dimension; other fields become lists."""
    out: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "row":
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
