"""Training-time pair dataset: items match the files, bad rows are skipped, counted and
logged once, and too many bad rows stop with a DataError."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from common.errors import DataError
from videodpo.data.dataset import BadRows, PairDataset, collate_pairs
from videodpo.data.video_io import load_clip, to_pil_image, write_video


def _clip(seed: int, frames: int = 5, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, size, size, generator=g) * 2 - 1


def _pairs(root: Path, n: int, bad: dict[int, str]) -> Path:
    """n pair rows; rows listed in `bad` (0-based) are broken in the named way."""
    rows = []
    for i in range(n):
        write_video(root / f"c{i}.mp4", _clip(2 * i))
        write_video(root / f"r{i}.mp4", _clip(2 * i + 1))
        row = {
            "chosen": f"c{i}.mp4",
            "rejected": f"r{i}.mp4",
            "caption": f"clip {i}",
            "meta": {"seed": i},
        }
        kind = bad.get(i)
        if kind == "missing":
            row["rejected"] = "nowhere.mp4"
        elif kind == "text":
            (root / f"t{i}.mp4").write_text("not a video")
            row["chosen"] = f"t{i}.mp4"
        elif kind == "caption":
            row["caption"] = ""
        elif kind == "shape":
            write_video(root / f"r{i}.mp4", _clip(0, size=16))
        rows.append(row)
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_items_match_the_files(tmp_path):
    manifest = _pairs(tmp_path, 3, {})
    ds = PairDataset(manifest, num_frames=4, height=16, width=16)
    assert len(ds) == 3
    item = ds[1]
    ref = load_clip(tmp_path / "c1.mp4", num_frames=4, height=16, width=16)
    assert torch.equal(item["chosen"], ref)
    assert item["rejected"].shape == (3, 4, 16, 16)
    assert item["caption"] == "clip 1" and item["row"] == 2 and item["meta"] == {"seed": 1}
    assert ds.bad.count == 0


def test_bad_rows_are_skipped_counted_and_logged_once(tmp_path, caplog):
    manifest = _pairs(tmp_path, 10, {2: "missing", 5: "shape"})
    ds = PairDataset(manifest, max_bad_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="videodpo.data.dataset"):
        for _ in range(2):  # two epochs
            loader = DataLoader(ds, batch_size=4, collate_fn=collate_pairs)
            batches = list(loader)
    rows = torch.cat([b["row"] for b in batches]).tolist()
    # a bad row is replaced by the next good one: batches stay full
    assert rows == [1, 2, 4, 4, 5, 7, 7, 8, 9, 10]
    assert [b["chosen"].shape[0] for b in batches] == [4, 4, 2]
    assert ds.bad.count == 2 and sorted(ds.bad.reasons) == [3, 6]
    assert "nowhere.mp4" in ds.bad.reasons[3] and "shape" in ds.bad.reasons[6]
    skipped = [r for r in caplog.records if "skipping row" in r.getMessage()]
    assert len(skipped) == 2


def test_too_many_bad_rows_stop_with_a_clear_error(tmp_path):
    manifest = _pairs(tmp_path, 10, {1: "missing", 3: "text", 6: "caption"})
    ds = PairDataset(manifest, max_bad_fraction=0.2)
    ds[1], ds[3]  # two bad rows of ten: still allowed
    assert ds.bad.count == 2
    with pytest.raises(DataError, match=r"3 of 10 rows are bad.*0.2"):
        ds[6]


def test_first_frame_from_image_or_chosen(tmp_path):
    manifest = _pairs(tmp_path, 2, {})
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    frame = load_clip(tmp_path / "c0.mp4")[:, 0]
    to_pil_image(frame).save(tmp_path / "first.png")
    rows[0]["image"] = "first.png"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PairDataset(manifest, with_first_frame=True)
    assert torch.allclose(ds[0]["first_frame"], frame, atol=1e-6)
    assert torch.equal(ds[1]["first_frame"], ds[1]["chosen"][:, 0])


def test_bad_rows_bookkeeping():
    bad = BadRows("m.jsonl", total=4, max_bad_fraction=0.25)
    bad.mark(1, "x")
    bad.mark(1, "x again")  # same row twice counts once
    assert bad.count == 1
    with pytest.raises(DataError, match="2 of 4"):
        bad.mark(2, "y")
    with pytest.raises(ValueError):
        BadRows("m", 1, 1.5)
