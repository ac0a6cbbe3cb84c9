"""`videodpo check-data`: every kind of bad row is named (row, field, file), exit 1;
a clean manifest exits 0; no tracebacks for data problems."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import DataError
from videodpo.cli import main
from videodpo.data.check import check_manifest, check_row
from videodpo.data.manifest import ManifestRow, check_fields
from videodpo.data.video_io import write_video

REPO = Path(__file__).resolve().parents[2]


def _clip(frames: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, size, size, generator=g) * 2 - 1


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset(root: Path) -> None:
    write_video(root / "good.mp4", _clip())
    write_video(root / "good2.mp4", _clip(seed=1))
    write_video(root / "short.mp4", _clip(frames=5))
    write_video(root / "small.mp4", _clip(size=16))
    data = write_video(root / "whole.mp4", _clip(seed=2)).read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "notes.mp4").write_text("this is a text file, not a video\n")


def test_bad_clip_rows_are_each_named(tmp_path, capsys):
    _dataset(tmp_path)
    manifest = _write_jsonl(
        tmp_path / "clips.jsonl",
        [
            {"video": "good.mp4", "caption": "fine"},  # row 1
            {"video": "truncated.mp4", "caption": "cut short"},  # row 2
            {"video": "missing.mp4", "caption": "gone"},  # row 3
            {"video": "notes.mp4", "caption": "text"},  # row 4
            {"video": "good2.mp4", "caption": "  "},  # row 5
            {"video": "short.mp4", "caption": "few frames", "num_frames": 9},  # row 6
            {"video": "good2.mp4", "caption": "fine too", "num_frames": 9},  # row 7
        ],
    )
    code = main(["check-data", "--manifest", str(manifest)])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.strip().splitlines()
    bad = [line for line in lines if "row " in line and "field" in line]
    assert len(bad) == 5, out
    expect = {
        2: ("video", "truncated.mp4"),
        3: ("video", "missing.mp4"),
        4: ("video", "notes.mp4"),
        5: ("caption", None),
        6: ("video", "short.mp4"),
    }
    for row, (field, file) in expect.items():
        [line] = [line for line in bad if f"row {row}:" in line]
        assert f"field '{field}'" in line
        if file:
            assert file in line
    assert "not found" in next(line for line in bad if "row 3:" in line)
    assert "5 frames" in next(line for line in bad if "row 6:" in line)
    assert lines[-1].endswith("7 clip rows checked, 2 good, 5 bad")
    assert "Traceback" not in out


def test_headers_only_names_the_same_rows_without_decoding(tmp_path, capsys, monkeypatch):
    import videodpo.data.check as check

    _dataset(tmp_path)
    manifest = _write_jsonl(
        tmp_path / "clips.jsonl",
        [
            {"video": "good.mp4", "caption": "fine"},
            {"video": "missing.mp4", "caption": "gone"},
            {"video": "notes.mp4", "caption": "text"},
            {"video": "good2.mp4", "caption": ""},
            {"video": "short.mp4", "caption": "few frames", "num_frames": 9},
        ],
    )
    decoded = [(p.row, p.field, p.file) for p in check_manifest(manifest).problems]
    monkeypatch.setattr(check, "verify_video", lambda path: pytest.fail(f"decoded {path}"))
    assert main(["check-data", "--manifest", str(manifest), "--headers-only"]) == 1
    assert capsys.readouterr().out.strip().endswith("5 clip rows checked, 1 good, 4 bad")
    headers = [(p.row, p.field, p.file) for p in check_manifest(manifest, decode=False).problems]
    assert headers == decoded and len(decoded) == 4


def test_pair_with_mismatched_shapes(tmp_path, capsys):
    _dataset(tmp_path)
    manifest = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"chosen": "good.mp4", "rejected": "good2.mp4", "caption": "ok", "meta": {"seed": 1}},
            {"chosen": "good.mp4", "rejected": "small.mp4", "caption": "size differs"},
            {"chosen": "good.mp4", "rejected": "short.mp4", "caption": "length differs"},
            {"chosen": "missing.mp4", "rejected": "good.mp4", "caption": ""},
        ],
    )
    report = check_manifest(manifest)
    assert report.kind == "pair" and report.bad_rows == [2, 3, 4]
    code = main(["check-data", "--manifest", str(manifest)])
    out = capsys.readouterr().out
    assert code == 1
    assert "row 2: field 'rejected' (small.mp4): shape" in out
    assert "(9, 16, 16) differs from chosen (9, 32, 32)" in out
    assert "row 3: field 'rejected' (short.mp4)" in out
    assert "row 4: field 'chosen' (missing.mp4): file not found" in out
    assert "row 4: field 'caption'" in out


def test_clean_manifests_pass(tmp_path, capsys):
    _dataset(tmp_path)
    (tmp_path / "sub").mkdir()
    clips = _write_jsonl(
        tmp_path / "sub" / "clips.jsonl",
        [
            {"video": "../good.mp4", "caption": "a", "num_frames": 9},
            {"video": str(tmp_path / "good2.mp4"), "caption": "b"},
        ],
    )
    assert main(["check-data", "--manifest", str(clips)]) == 0
    csv = tmp_path / "pairs.csv"
    csv.write_text("chosen,rejected,caption\ngood.mp4,good2.mp4,a red square\n")
    assert main(["check-data", "--manifest", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "2 clip rows checked, 2 good, 0 bad" in out
    assert "1 pair rows checked, 1 good, 0 bad" in out


def _broken_manifest(tmp_path: Path) -> Path:
    _dataset(tmp_path)
    manifest = _write_jsonl(
        tmp_path / "m.jsonl", [{"video": "notes.mp4", "caption": "x"}, {"nonsense": 1}]
    )
    with manifest.open("a") as fh:
        fh.write("{not json\n")
    return manifest


def _assert_named(out: str) -> None:
    assert "row 1: field 'video' (notes.mp4)" in out
    assert "row 2: field 'video': missing" in out
    assert "row 3: field 'row': expected a JSON object" in out


def test_unparsable_rows_and_missing_manifest(tmp_path, capsys):
    manifest = _broken_manifest(tmp_path)
    assert main(["check-data", "--manifest", str(manifest)]) == 1
    _assert_named(capsys.readouterr().out)
    # a manifest that does not exist: one line on stderr, exit 1
    assert main(["check-data", "--manifest", str(tmp_path / "no.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("videodpo check-data: error:") and "no.jsonl" in err[-1]


@pytest.mark.slow  # a fresh interpreter imports every sub-command: 10-30 s on a busy machine
def test_console_entry_point_has_no_traceback(tmp_path):
    manifest = _broken_manifest(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "videodpo.cli", "check-data", "--manifest", str(manifest)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stdout + run.stderr
    _assert_named(run.stdout)


@pytest.mark.parametrize("kind, row, field", [
    ("pair", {"rejected": "good2.mp4", "caption": "c"}, "chosen"),
    ("pair", {"chosen": "good.mp4", "rejected": 3, "caption": "c"}, "rejected"),
    ("pair", {"chosen": "good.mp4", "rejected": "good2.mp4", "caption": "  "}, "caption"),
    ("pair", {"chosen": "good.mp4", "rejected": "good2.mp4", "caption": "c", "image": ["x"]}, "image"),
    ("clip", {"video": "", "caption": "c"}, "video"),
    ("clip", {"video": "good.mp4"}, "caption"),
])
def test_check_data_and_the_readers_parse_a_row_the_same_way(tmp_path, kind, row, field):
    """One parser of a row's fields: check-data names the field the training readers and
    build-pairs refuse the row for."""
    _dataset(tmp_path)
    manifest_row = ManifestRow(1, row)
    problems = check_row(manifest_row, tmp_path, kind)
    assert problems and problems[0].field == field
    with pytest.raises(DataError, match=f"field '{field}'"):
        check_fields(manifest_row, kind)
    good = {"pair": {"chosen": "good.mp4", "rejected": "good2.mp4", "caption": "c"},
            "clip": {"video": "good.mp4", "caption": "c"}}[kind]
    assert check_row(ManifestRow(1, good), tmp_path, kind) == []
    check_fields(ManifestRow(1, good), kind)
