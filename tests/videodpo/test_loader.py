"""The prefetching training loader: workers change nothing but where rows are read,
kill-and-resume is bit-identical, and a corrupt row is skipped and counted once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from common.errors import DataError
from videodpo.data.dataset import PairDataset
from videodpo.data.loader import PairLoader, PairSampler
from videodpo.data.video_io import write_video


class Rows:
    """Row i is a tensor made from i; `pid` says which process read it."""

    def __init__(self, n: int = 7) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(3, generator=g), "i": i, "pid": os.getpid()}


def _stack(items: list[dict]) -> dict:
    return {"x": torch.stack([it["x"] for it in items]), "i": [it["i"] for it in items],
            "pid": {it["pid"] for it in items}}


def _loader(data, workers: int, batch: int = 3, seed: int = 4) -> PairLoader:
    return PairLoader(data, batch, PairSampler(len(data), seed), _stack, 0.5, num_workers=workers)


def test_two_workers_give_the_same_batches_as_none():
    plain, ahead = _loader(Rows(), 0), _loader(Rows(), 2)
    for _ in range(5):  # past two epochs of 7 rows
        a, b = plain.next_batch(), ahead.next_batch()
        assert a["i"] == b["i"] and torch.equal(a["x"], b["x"])
        assert a["pid"] == {os.getpid()} and os.getpid() not in b["pid"]  # workers read them
    ahead.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_with_workers_is_bit_identical(workers):
    straight = _loader(Rows(), workers)
    expect = [straight.next_batch() for _ in range(7)]
    straight.close()
    first = _loader(Rows(), workers)
    got = [first.next_batch() for _ in range(3)]  # workers have read ahead by now
    state = first.state_dict()
    first.close()  # "killed"
    resumed = _loader(Rows(), workers)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(4)]
    resumed.close()
    assert [b["i"] for b in got] == [b["i"] for b in expect]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(got, expect))


def _manifest(root: Path, n: int, corrupt: int) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        chosen, rejected = (torch.rand(3, 2, 8, 8, generator=g) * 2 - 1 for _ in range(2))
        lines.append({"chosen": str(write_video(root / f"c{i}.mp4", chosen)),
                      "rejected": str(write_video(root / f"r{i}.mp4", rejected)), "caption": f"clip {i}"})
    (root / "broken.mp4").write_bytes(b"not a video at all")
    lines[corrupt]["chosen"] = str(root / "broken.mp4")
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _rows(items: list[dict]) -> list[int]:
    return [it["row"] for it in items]


def test_a_corrupt_row_is_skipped_and_counted_once_across_workers(tmp_path):
    data = PairDataset(_manifest(tmp_path, 5, corrupt=2), max_bad_fraction=0.2)
    loader = PairLoader(data, 2, PairSampler(len(data), 1), _rows, 0.2, num_workers=2)
    rows = [r for _ in range(6) for r in loader.next_batch()]  # 12 good rows: three epochs
    loader.close()
    assert 3 not in rows and sorted(set(rows)) == [1, 2, 4, 5]  # manifest line 3 is the corrupt one
    assert loader.skipped_rows == 1 and data.bad.count == 1 and "broken.mp4" in data.bad.reasons[3]
    assert loader.state_dict()["bad_rows"] == data.bad.reasons  # the count goes into checkpoints
    strict = PairDataset(_manifest(tmp_path, 5, corrupt=2), max_bad_fraction=0.1)
    with pytest.raises(DataError, match="1 of 5 rows are bad"):
        PairLoader(strict, 5, PairSampler(5, 1), _rows, num_workers=2).next_batch()


def _mark_reader(item: dict) -> dict:
    return {**item, "x": item["x"] * 2, "pid": os.getpid()}


def test_the_row_transform_runs_in_the_workers():
    """The trainer encodes rows here when the encoders are on the CPU: in the workers,
    overlapping the step, with the same result as in this process."""
    plain = PairLoader(Rows(), 3, PairSampler(7, 4), _stack, num_workers=0, transform=_mark_reader)
    ahead = PairLoader(Rows(), 3, PairSampler(7, 4), _stack, num_workers=2, transform=_mark_reader)
    a, b = plain.next_batch(), ahead.next_batch()
    ahead.close()
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["x"], 2 * _stack([Rows()[i] for i in a["i"]])["x"])
    assert a["pid"] == {os.getpid()} and os.getpid() not in b["pid"]
