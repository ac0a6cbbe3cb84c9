"""Manifests: JSONL and CSV read the same rows, paths are relative to the manifest."""

from __future__ import annotations

import json

import pytest

from common.errors import DataError
from videodpo.data.manifest import (
    append_manifest_row,
    read_manifest,
    read_manifest_rows,
    write_manifest,
)


def test_jsonl_round_trip_with_relative_paths(tmp_path):
    out = tmp_path / "sets" / "pairs.jsonl"
    rows = [
        {
            "chosen": str(tmp_path / "sets" / "real" / "a.mp4"),
            "rejected": "gen/a.mp4",
            "caption": "a red square",
            "image": str(tmp_path / "frames" / "a.png"),
            "meta": {"generator": "tiny", "seed": 3, "steps": 2, "guidance": 5.0},
        }
    ]
    write_manifest(out, rows)
    stored = json.loads(out.read_text())
    assert stored["chosen"] == "real/a.mp4"  # relative to the manifest's folder
    assert stored["rejected"] == "gen/a.mp4"
    assert stored["image"] == "../frames/a.png" or stored["image"] == str(
        tmp_path / "frames" / "a.png"
    )
    [back] = read_manifest(out)
    assert back["chosen"] == str((tmp_path / "sets" / "real" / "a.mp4").resolve())
    assert back["rejected"] == str((tmp_path / "sets" / "gen" / "a.mp4").resolve())
    assert back["meta"] == rows[0]["meta"]


def test_csv_reads_like_jsonl(tmp_path):
    rows = [
        {"video": "clips/a.mp4", "caption": "one, with a comma", "fps": 8.0, "num_frames": 9},
        {"video": "clips/b.mp4", "caption": "two", "fps": 24.0, "num_frames": 17},
    ]
    write_manifest(tmp_path / "m.csv", rows)
    write_manifest(tmp_path / "m.jsonl", rows)
    assert read_manifest(tmp_path / "m.csv") == read_manifest(tmp_path / "m.jsonl")
    assert read_manifest(tmp_path / "m.csv")[1]["num_frames"] == 17


def test_append_and_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    append_manifest_row(path, {"video": str(tmp_path / "x.mp4"), "caption": "x"})
    append_manifest_row(path, {"video": "y.mp4", "caption": "y"})
    with path.open("a") as fh:
        fh.write("\n[1, 2]\n{broken\n")
    rows = read_manifest_rows(path, strict=False)
    assert [r.index for r in rows] == [1, 2, 4, 5]  # blank line 3 skipped, numbers kept
    assert rows[0].data["video"] == "x.mp4"
    assert rows[2].error and "list" in rows[2].error
    assert rows[3].error and "invalid JSON" in rows[3].error
    with pytest.raises(DataError, match=r"m.jsonl:4"):
        read_manifest_rows(path)
    with pytest.raises(DataError, match="not found"):
        read_manifest_rows(tmp_path / "none.jsonl")


def test_csv_with_a_utf8_bom_reads_its_first_column(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufeffchosen,rejected,caption\nreal/a.mp4,gen/a.mp4,a café\n".encode())
    rows = read_manifest(path)
    assert rows[0]["chosen"] == str(tmp_path / "real" / "a.mp4")
    assert rows[0]["caption"] == "a café"


@pytest.mark.parametrize("cell, message", [
    ('"{not json}"', r"row 1: field 'meta': not JSON"),
    ('"[1, 2]"', r"row 1: field 'meta': expected a JSON object, got list"),
])
def test_csv_bad_meta_names_row_and_field(tmp_path, cell, message):
    path = tmp_path / "pairs.csv"
    path.write_text(f"chosen,rejected,caption,meta\na.mp4,b.mp4,cap,{cell}\n")
    with pytest.raises(DataError, match=rf"pairs.csv: {message}"):
        read_manifest_rows(path)
    rows = read_manifest_rows(path, strict=False)  # check-data reports it as a bad row
    assert rows[0].error and rows[0].error_field == "meta"


def test_csv_non_integer_num_frames_names_row_and_field(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("video,caption,num_frames\na.mp4,cap,8\nb.mp4,cap,eight\n")
    with pytest.raises(DataError, match=r"clips.csv: row 2: field 'num_frames': expected an integer, got 'eight'"):
        read_manifest_rows(path)


def test_non_utf8_manifest_and_directory_are_one_line_errors(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"chosen": "a.mp4", "rejected": "b.mp4", "caption": "x"}\n{"caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:2: not UTF-8 text"):
        read_manifest_rows(path)
    with pytest.raises(DataError, match=r"is a directory, expected a JSONL or CSV manifest file"):
        read_manifest_rows(tmp_path)
