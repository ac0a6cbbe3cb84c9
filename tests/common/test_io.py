"""Atomic writes: a finished write replaces the file, a failed one leaves it untouched."""

import pytest

from common.io import atomic_path, write_text_atomic


def test_write_text_atomic_replaces_and_leaves_no_partial(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_path_replaces_a_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("x")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["weights.bin"]
