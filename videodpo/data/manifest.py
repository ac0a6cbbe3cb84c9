"""Manifests: JSONL or CSV files listing clips or preference pairs.

Paths inside a manifest are relative to the manifest's folder. Clip rows hold
`video`, `caption` and optionally `image`, `fps`, `num_frames`; pair rows hold `chosen`,
`rejected`, `caption`, optionally `image` and `meta` (generator, seed, steps, guidance).
Readers return rows with paths resolved; writers take absolute or relative paths and
store them relative to the manifest. Manifests are UTF-8 (a byte-order mark, as
spreadsheet programs write it, is accepted); anything else is an error naming the line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import DataError
from common.io import atomic_path

# the video fields of each kind of row (both kinds also need a caption)
VIDEO_FIELDS: dict[str, tuple[str, ...]] = {"clip": ("video",), "pair": ("chosen", "rejected")}
PATH_FIELDS: tuple[str, ...] = ("video", "image", "chosen", "rejected")


@dataclass
class ManifestRow:
    """One row: `index` is its 1-based line (JSONL) or data-row number (CSV); `error`
    says why a line could not be parsed (then `data` is empty)."""

    index: int
    data: dict = field(default_factory=dict)
    error: str | None = None
    error_field: str = "row"  # the field `error` is about

    def path(self, key: str, root: Path) -> Path | None:
        value = self.data.get(key)
        if value in (None, ""):
            return None
        return resolve_path(root, value)


@dataclass(frozen=True)
class PairFields:
    """The fields of a pair row that a reader needs, checked, with absolute paths."""

    caption: str
    chosen: Path
    rejected: Path
    image: Path | None  # the I2V conditioning image; None: the chosen clip's first frame
    meta: dict


def field_problems(row: ManifestRow, kind: str) -> list[tuple[str, str]]:
    """(field, message) for each field of a `kind` ("clip" or "pair") row that is missing
    or of the wrong type, before any file is opened; empty when the row can be read. The
    one parser of a row's fields: readers raise the first (`check_fields`), `check-data`
    reports them all."""
    if row.error is not None:
        return [(row.error_field, row.error)]
    problems = []
    for key in VIDEO_FIELDS[kind]:
        value = row.data.get(key)
        if value in (None, ""):
            problems.append((key, "missing"))
        elif not isinstance(value, str):
            problems.append((key, f"expected a path, got {value!r}"))
    caption = row.data.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        problems.append(("caption", "missing or empty"))
    image = row.data.get("image")
    if image not in (None, "") and not isinstance(image, str):
        problems.append(("image", f"expected a path, got {image!r}"))
    return problems


def check_fields(row: ManifestRow, kind: str) -> None:
    """A DataError naming the first bad field of `row` (see `field_problems`)."""
    if row.error is not None:
        raise DataError(row.error)
    problems = field_problems(row, kind)
    if problems:
        name, message = problems[0]
        raise DataError(f"field '{name}': {message}")


def pair_fields(row: ManifestRow, root: Path) -> PairFields:
    """Parse one pair row of a manifest in folder `root`; a DataError names the bad field."""
    check_fields(row, "pair")
    image = row.data.get("image")
    return PairFields(row.data["caption"], resolve_path(root, row.data["chosen"]),
                      resolve_path(root, row.data["rejected"]), resolve_path(root, image) if image else None,
                      row.data.get("meta") or {})


def resolve_path(root: Path, value: str) -> Path:
    """`value` as stored in a manifest in folder `root`, made absolute and normalised."""
    p = Path(value)
    return Path(os.path.normpath(p if p.is_absolute() else Path(root).absolute() / p))


def _manifest_text(path: Path) -> str:
    """The manifest's text as UTF-8 (a leading byte-order mark is dropped)."""
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL or CSV manifest file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None


def read_manifest_rows(path: str | Path, strict: bool = True) -> list[ManifestRow]:
    """Rows as stored (paths not resolved). A line that is not a JSON object (or a CSV row
    whose `meta` is not JSON or whose `fps` / `num_frames` is not a number) raises
    DataError naming the line, or with `strict=False` comes back with `error` set.
    Blank lines are skipped."""
    path = Path(path)
    text = _manifest_text(path)
    rows = []
    if path.suffix.lower() == ".csv":
        for i, raw in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1):
            try:
                rows.append(ManifestRow(i, _csv_row(raw)))
            except _FieldError as err:
                if strict:
                    raise DataError(f"{path}: row {i}: field '{err.field}': {err}") from None
                rows.append(ManifestRow(i, {}, str(err), err.field))
        return rows
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            error = None if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        except json.JSONDecodeError as err:
            error = f"invalid JSON ({err.msg})"
        if error is not None:
            if strict:
                raise DataError(f"{path}:{i}: expected a JSON object, got {error}")
            rows.append(ManifestRow(i, {}, f"expected a JSON object, got {error}"))
            continue
        rows.append(ManifestRow(i, data))
    return rows


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _csv_row(row: dict) -> dict:
    """One CSV row with `meta` parsed as JSON and `fps` / `num_frames` as numbers;
    _FieldError naming the field otherwise."""
    out: dict = {}
    for key, value in row.items():
        if key is None:
            continue
        if key == "meta" and value:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise _FieldError("meta", f"not JSON ({err.msg}): {value[:60]!r}") from None
            if not isinstance(value, dict):
                raise _FieldError("meta", f"expected a JSON object, got {type(value).__name__}")
        elif key in ("fps", "num_frames") and value not in (None, ""):
            try:
                value = float(value) if key == "fps" else int(value)
            except ValueError:
                kind = "a number" if key == "fps" else "an integer"
                raise _FieldError(key, f"expected {kind}, got {value!r}") from None
        out[key] = value
    return out


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a clip or pair manifest with every path field made absolute."""
    path = Path(path)
    root = path.parent.resolve()
    rows = []
    for row in read_manifest_rows(path):
        data = dict(row.data)
        for key in PATH_FIELDS:
            if data.get(key) not in (None, ""):
                data[key] = str(resolve_path(root, data[key]))
        rows.append(data)
    return rows


def _relative(value: str | Path, root: Path) -> str:
    p = Path(value)
    if not p.is_absolute():
        return p.as_posix()
    return Path(os.path.relpath(p.resolve(), root)).as_posix()


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL (or CSV by suffix), paths stored relative to the manifest's
    folder. Atomic: written to a temporary file, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    out = []
    for row in rows:
        data = dict(row)
        for key in PATH_FIELDS:
            if data.get(key) not in (None, ""):
                data[key] = _relative(data[key], root)
        out.append(data)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            keys = list(dict.fromkeys(k for row in out for k in row))
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                for row in out:
                    writer.writerow(
                        {k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
                    )
        else:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in out))
    return path


def append_manifest_row(path: str | Path, row: dict) -> None:
    """Append one JSONL row (paths relative to the manifest), flushed at once; used for
    resumable builders."""
    path = Path(path)
    root = path.parent.resolve()
    data = dict(row)
    for key in PATH_FIELDS:
        if data.get(key) not in (None, ""):
            data[key] = _relative(data[key], root)
    with path.open("a") as fh:
        fh.write(json.dumps(data) + "\n")
        fh.flush()
