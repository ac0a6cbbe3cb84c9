"""Reading and writing video clips.

Clips inside the project are float tensors (C, F, H, W) in [-1, 1]. Reading uses decord
when it is installed and falls back to PyAV (chosen automatically, with a log line);
frames are sampled by count, stride or target fps, resized and center-cropped with
torch ops. Writing uses PyAV (H.264, 4:4:4, near-lossless by default) and is atomic.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import DataError
from common.io import atomic_path

logger = logging.getLogger(__name__)

READERS: tuple[str, ...] = ("auto", "decord", "pyav")


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


@functools.cache
def default_reader() -> str:
    """The reader "auto" picks: decord if it imports, else PyAV (said once in the log)."""
    try:
        import decord  # noqa: F401  # lazy: optional extra, probed only
    except ImportError:
        logger.info("decord is not available; reading video with PyAV")
        return "pyav"
    return "decord"


@functools.lru_cache(maxsize=4096)
def _log_fallback(path: str, reason: str) -> None:
    """Say once per file that decord failed and PyAV reads it instead."""
    logger.info("decord cannot read %s (%s); reading it with PyAV", path, reason)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _decord_reader(path: Path):
    import decord  # lazy: optional extra (faster seeking), when installed

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)


def _pyav_read(path: Path, indices: Sequence[int] | None) -> tuple[np.ndarray, float]:
    """Decode in order, keeping only the frames asked for and stopping after the last."""
    fps, _ = _pyav_stream_info(path)
    if indices is None:
        frames = list(_pyav_frames(path))
        if not frames:
            raise DataError(f"{path}: no decodable frames")
        return np.stack(frames), fps
    wanted, last, kept, count = set(indices), max(indices, default=-1), {}, 0
    for i, frame in enumerate(_pyav_frames(path)):
        count = i + 1
        if i in wanted:
            kept[i] = frame
        if i >= last:
            break
    _check_indices(path, list(indices), count)
    return np.stack([kept[i] for i in indices]), fps


def _pyav_probe(path: Path) -> VideoInfo:
    """From the container header when it says everything, else by decoding."""
    import av  # lazy: PyAV loads FFmpeg's libraries; only when a clip is read or written

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        declared = int(stream.frames or 0)
        height, width = stream.codec_context.height, stream.codec_context.width
    if declared and height and width:
        return VideoInfo(declared, fps, int(height), int(width))
    return verify_video(path)


def _pyav_stream_info(path: Path) -> tuple[float, int]:
    """fps and the frame count the container declares (0 when it does not say)."""
    import av  # lazy: PyAV loads FFmpeg's libraries; only when a clip is read or written

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        return float(stream.average_rate or stream.guessed_rate or 0), int(stream.frames or 0)


def _pyav_frames(path: Path):
    """Yield rgb24 frames one at a time, so long videos need not fit in memory."""
    import av  # lazy: PyAV loads FFmpeg's libraries; only when a clip is read or written

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        for frame in container.decode(container.streams.video[0]):
            yield frame.to_ndarray(format="rgb24")


def _short(err: Exception) -> str:
    """decord prefixes messages with a timestamp and a source location; keep the gist."""
    if getattr(err, "strerror", None):  # PyAV: "Invalid data found when processing input"
        return err.strerror
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[\d:]+\] \S+: ", "", text)


def _with_reader(path: Path, reader: str, decord_fn, pyav_fn):
    """Run `decord_fn` or `pyav_fn`; under "auto" a decord failure retries with PyAV."""
    _check_exists(path)
    if reader not in READERS:
        raise DataError(f"unknown video reader {reader!r}, expected one of {READERS}")
    chosen = default_reader() if reader == "auto" else reader
    if chosen == "decord":
        try:
            return decord_fn()
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - decord raises bare errors for bad files
            if reader == "decord":
                raise DataError(f"{path}: cannot decode video with decord: {_short(err)}") from err
            _log_fallback(str(path), _short(err))
    try:
        return pyav_fn()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any PyAV failure means the file is unusable
        raise DataError(f"{path}: cannot decode video: {_short(err)}") from err


def probe_video(path: str | Path, reader: str = "auto") -> VideoInfo:
    """Frame count, fps and size of a video file, from its header where it has them
    (use `verify_video` to decode every frame)."""
    path = Path(path)

    def with_decord() -> VideoInfo:
        vr = _decord_reader(path)
        height, width = vr[0].shape[:2]
        return VideoInfo(len(vr), float(vr.get_avg_fps()), int(height), int(width))

    def with_pyav() -> VideoInfo:
        return _pyav_probe(path)

    return _with_reader(path, reader, with_decord, with_pyav)


def verify_video(path: str | Path) -> VideoInfo:
    """Decode every frame with PyAV, one at a time; raise DataError when the file is
    missing, does not decode, has no frames, or yields fewer frames than its header
    declares (a truncated file)."""

    path = Path(path)
    _check_exists(path)
    count, shape = 0, (0, 0)
    try:
        fps, declared = _pyav_stream_info(path)
        for frame in _pyav_frames(path):
            count, shape = count + 1, frame.shape[:2]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any PyAV failure means the file is unusable
        raise DataError(f"{path}: cannot decode video: {_short(err)}") from err
    if count == 0:
        raise DataError(f"{path}: no decodable frames")
    if declared and count < declared:
        raise DataError(f"{path}: truncated: decoded {count} of {declared} frames")
    return VideoInfo(count, fps, int(shape[0]), int(shape[1]))


def read_frames(
    path: str | Path, indices: Sequence[int] | None = None, reader: str = "auto"
) -> tuple[torch.Tensor, float]:
    """Frames `indices` (all when None) as uint8 (F, H, W, 3), and the file's fps."""
    path = Path(path)

    def with_decord() -> tuple[torch.Tensor, float]:
        vr = _decord_reader(path)
        idx = list(range(len(vr))) if indices is None else list(indices)
        _check_indices(path, idx, len(vr))
        return torch.from_numpy(vr.get_batch(idx).asnumpy()), float(vr.get_avg_fps())

    def with_pyav() -> tuple[torch.Tensor, float]:
        frames, fps = _pyav_read(path, indices)
        return torch.from_numpy(frames), fps

    return _with_reader(path, reader, with_decord, with_pyav)


def _check_indices(path: Path, indices: list[int], total: int) -> None:
    if indices and (min(indices) < 0 or max(indices) >= total):
        raise DataError(f"{path}: needs frame {max(indices)} but has {total} frames")


def sample_frame_indices(
    total: int,
    num_frames: int | None = None,
    stride: int = 1,
    source_fps: float | None = None,
    target_fps: float | None = None,
    start: int = 0,
) -> list[int]:
    """Indices of frames to keep: every `stride`-th frame from `start`, or frames at
    `target_fps` when both fps are given; `num_frames` of them (all that fit when None).
    Raises DataError when the video is too short."""
    step = float(stride)
    if target_fps is not None and source_fps:
        step = source_fps / target_fps
    if step <= 0:
        raise DataError(f"frame step must be positive, got {step}")
    available = max(0, math.floor((total - 1 - start) / step) + 1) if total > start else 0
    count = available if num_frames is None else num_frames
    if count > available or count <= 0:
        raise DataError(
            f"video has {total} frames; {count} frames at step {step:g} from {start} need "
            f"{start + math.ceil((count - 1) * step) + 1}"
        )
    return [start + round(i * step) for i in range(count)]


def frames_to_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (3, F, H, W) in [-1, 1]."""
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def clip_to_frames(clip: torch.Tensor) -> torch.Tensor:
    """float (3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3), rounding to nearest."""
    return (
        clip.detach()
        .float()
        .clamp(-1, 1)
        .add(1)
        .mul(127.5)
        .round()
        .to(torch.uint8)
        .permute(1, 2, 3, 0)
    )


def resize_center_crop(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (C, F, H, W) so it covers height x width, then crop the center."""
    c, f, h, w = clip.shape
    if (h, w) == (height, width):
        return clip
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    frames = clip.permute(1, 0, 2, 3).float()  # (F, C, H, W): frames as a batch
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(
            frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1
        )
    top, left = (new_h - height) // 2, (new_w - width) // 2
    frames = frames[:, :, top : top + height, left : left + width]
    return frames.permute(1, 0, 2, 3).contiguous()


def load_clip(
    path: str | Path,
    num_frames: int | None = None,
    stride: int = 1,
    fps: float | None = None,
    height: int | None = None,
    width: int | None = None,
    reader: str = "auto",
) -> torch.Tensor:
    """A clip as float32 (3, F, H, W) in [-1, 1]: sampled, then resized and cropped
    when `height` and `width` are given."""
    info = probe_video(path, reader)
    try:
        idx = sample_frame_indices(info.num_frames, num_frames, stride, info.fps, fps)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    frames, _ = read_frames(path, idx, reader)
    clip = frames_to_clip(frames)
    if height is not None and width is not None:
        clip = resize_center_crop(clip, height, width)
    return clip


def first_frame(
    path: str | Path, height: int | None = None, width: int | None = None, reader: str = "auto"
) -> torch.Tensor:
    """The first frame as float32 (3, H, W) in [-1, 1], for image-to-video conditioning."""
    frames, _ = read_frames(path, [0], reader)
    clip = frames_to_clip(frames)
    if height is not None and width is not None:
        clip = resize_center_crop(clip, height, width)
    return clip[:, 0]


def load_image(
    path: str | Path, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """An image file as float32 (3, H, W) in [-1, 1], resized and center-cropped when
    `height` and `width` are given (a conditioning image for image-to-video)."""
    path = Path(path)
    _check_exists(path)
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except OSError as err:
        raise DataError(f"{path}: cannot open image: {err}") from None
    frame = frames_to_clip(torch.from_numpy(pixels)[None])
    if height is not None and width is not None:
        frame = resize_center_crop(frame, height, width)
    return frame[:, 0]


def to_pil_image(frame: torch.Tensor):
    """float (3, H, W) in [-1, 1] -> PIL image (what diffusers I2V pipelines take)."""
    return Image.fromarray(clip_to_frames(frame[:, None])[0].numpy())


def write_video(path: str | Path, clip: torch.Tensor, fps: float = 8.0, crf: int = 0) -> Path:
    """Write float (3, F, H, W) in [-1, 1] as H.264 mp4 (yuv444p; crf 0 is near-lossless:
    one level of rounding). Written to a temporary name first, so a file that exists is
    complete."""
    import av  # lazy: PyAV loads FFmpeg's libraries; only when a clip is read or written

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = clip_to_frames(clip).numpy()
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv444p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path
