"""`videodpo check-data`: validate every row of a clip or pair manifest.

Each row is checked for: its video files exist and decode to the end, they have enough
frames, the caption is a non-empty string, an optional conditioning image opens, and the
two videos of a pair have the same shape (frames, height, width). `--headers-only` reads
each video's header instead of decoding every frame (fast on large datasets; a file cut
short is then found only when training reads it, which skips and counts the row). Every problem is one
line naming the row, the field and the file; a summary follows; the exit code is 1 when
any row is bad.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from common.errors import ConfigError, DataError
from videodpo.data.manifest import (
    VIDEO_FIELDS,
    ManifestRow,
    field_problems,
    read_manifest_rows,
    resolve_path,
)
from videodpo.data.video_io import VideoInfo, probe_video, verify_video

HELP = "validate every row of a clip or pair manifest; exit 1 naming each bad row"


@dataclass
class RowProblem:
    row: int
    field: str
    file: str | None
    message: str

    def __str__(self) -> str:
        where = f" ({self.file})" if self.file else ""
        return f"row {self.row}: field '{self.field}'{where}: {self.message}"


@dataclass
class CheckReport:
    manifest: Path
    kind: str
    num_rows: int
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def bad_rows(self) -> list[int]:
        return sorted({p.row for p in self.problems})

    def summary(self) -> str:
        bad = len(self.bad_rows)
        return (
            f"{self.manifest}: {self.num_rows} {self.kind} rows checked, "
            f"{self.num_rows - bad} good, {bad} bad"
        )


def _check_video(
    row: ManifestRow, key: str, root: Path, min_frames: int, decode: bool = True
) -> tuple[list[RowProblem], VideoInfo | None]:
    """The file behind field `key` (already parsed by `field_problems`): present, decodes,
    long enough."""
    value = row.data[key]
    path = resolve_path(root, value)
    if not path.is_file():
        return [RowProblem(row.index, key, value, "file not found")], None
    try:
        info = verify_video(path) if decode else probe_video(path)
    except DataError as err:
        message = str(err).removeprefix(f"{path}: ")
        return [RowProblem(row.index, key, value, message)], None
    if info.num_frames < min_frames:
        problem = RowProblem(
            row.index, key, value, f"has {info.num_frames} frames, needs at least {min_frames}"
        )
        return [problem], info
    return [], info


def _check_image(row: ManifestRow, root: Path) -> list[RowProblem]:
    value = row.data.get("image")
    if value in (None, ""):
        return []
    path = resolve_path(root, value)
    if not path.is_file():
        return [RowProblem(row.index, "image", value, "file not found")]
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 - any PIL failure means the image is unusable
        return [RowProblem(row.index, "image", value, f"cannot open image: {err}")]
    return []


def check_row(
    row: ManifestRow, root: Path, kind: str, min_frames: int = 1, decode: bool = True
) -> list[RowProblem]:
    """Problems of one manifest row (empty when the row is good); `decode=False` reads
    video headers only. Fields are parsed as the readers parse them
    (`videodpo.data.manifest.field_problems`); then the files behind the good ones are opened."""
    problems = [RowProblem(row.index, name, None, message) for name, message in field_problems(row, kind)]
    if row.error is not None:
        return problems
    bad = {p.field for p in problems}
    declared = row.data.get("num_frames")
    if declared is not None and not (isinstance(declared, int) and declared > 0):
        problems.append(
            RowProblem(row.index, "num_frames", None, f"expected a positive int, got {declared!r}")
        )
        declared = None
    needed = max(min_frames, declared or 0)
    infos = {}
    for key in VIDEO_FIELDS[kind]:
        if key not in bad:
            found, infos[key] = _check_video(row, key, root, needed, decode)
            problems += found
    chosen, rejected = infos.get("chosen"), infos.get("rejected")
    if chosen and rejected:
        shape_c = (chosen.num_frames, chosen.height, chosen.width)
        shape_r = (rejected.num_frames, rejected.height, rejected.width)
        if shape_c != shape_r:
            message = f"shape (frames, height, width) {shape_r} differs from chosen {shape_c}"
            problems.append(RowProblem(row.index, "rejected", row.data["rejected"], message))
    if "image" not in bad:
        problems += _check_image(row, root)
    return problems


def check_manifest(path: str | Path, min_frames: int = 1, decode: bool = True) -> CheckReport:
    """Check every row of a manifest; the kind (clip or pair) comes from its rows."""
    if min_frames < 1:
        raise ConfigError(f"--min-frames: expected an integer >= 1, got {min_frames}")
    path = Path(path)
    rows = read_manifest_rows(path, strict=False)
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    is_pair = any("chosen" in r.data or "rejected" in r.data for r in rows)
    kind = "pair" if is_pair else "clip"
    report = CheckReport(path, kind, len(rows))
    root = path.parent
    for row in rows:
        report.problems += check_row(row, root, kind, min_frames, decode)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="JSONL or CSV manifest of clips or pairs")
    parser.add_argument(
        "--min-frames", type=int, default=1, help="fewest frames a video may have (default 1)"
    )
    parser.add_argument(
        "--headers-only", action="store_true",
        help="read video headers instead of decoding every frame (fast; misses files cut short)",
    )


def run(args: argparse.Namespace) -> int:
    report = check_manifest(args.manifest, args.min_frames, decode=not args.headers_only)
    for problem in report.problems:
        print(f"{report.manifest}: {problem}")
    print(report.summary())
    return 1 if report.problems else 0
