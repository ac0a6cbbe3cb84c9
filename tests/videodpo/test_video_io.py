"""Video I/O: write/read round trips with both readers, frame sampling, resize and crop."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from common.errors import DataError
from videodpo.data.video_io import (
    clip_to_frames,
    first_frame,
    frames_to_clip,
    load_clip,
    probe_video,
    read_frames,
    resize_center_crop,
    sample_frame_indices,
    to_pil_image,
    verify_video,
    write_video,
)


def _random_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth content (x264 at crf 0 is lossless up to colour conversion rounding)
    base = torch.rand(3, frames, height // 4, width // 4, generator=g) * 2 - 1
    return F.interpolate(base, size=(height, width), mode="nearest")


@pytest.mark.parametrize("reader", ["decord", "pyav", "auto"])
def test_round_trip(tmp_path, reader):
    clip = _random_clip(9, 32, 64)
    path = write_video(tmp_path / "a.mp4", clip, fps=12)
    assert not list(tmp_path.glob("*.partial"))
    info = probe_video(path, reader)
    assert (info.num_frames, info.height, info.width) == (9, 32, 64)
    assert info.fps == pytest.approx(12)
    back = load_clip(path, reader=reader)
    assert back.shape == clip.shape and back.dtype == torch.float32
    assert back.min() >= -1 and back.max() <= 1
    # 4:4:4 at crf 0: at most a few levels of RGB<->YUV rounding
    assert (back - clip).abs().max() <= 3 / 127.5


def test_readers_agree_bit_for_bit(tmp_path):
    path = write_video(tmp_path / "a.mp4", _random_clip(8, 32, 32, seed=1))
    a, fps_a = read_frames(path, [0, 3, 7], reader="decord")
    b, fps_b = read_frames(path, [0, 3, 7], reader="pyav")
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32, 3)
    assert torch.equal(a, b) and fps_a == fps_b


def test_auto_falls_back_to_pyav_with_a_log_line(tmp_path, caplog):
    # decord 0.6 cannot return frames 16 pixels wide; "auto" must still read them
    clip = _random_clip(8, 16, 16)
    path = write_video(tmp_path / "small.mp4", clip)
    with caplog.at_level(logging.INFO, logger="videodpo.data.video_io"):
        back = load_clip(path)
    assert (back - clip).abs().max() <= 3 / 127.5
    assert any("PyAV" in r.getMessage() for r in caplog.records)


def test_uint8_conversion_round_trips():
    frames = torch.randint(0, 256, (4, 5, 6, 3), dtype=torch.uint8)
    clip = frames_to_clip(frames)
    assert clip.shape == (3, 4, 5, 6)
    assert torch.allclose(clip, frames.permute(3, 0, 1, 2).float() / 127.5 - 1)
    assert torch.equal(clip_to_frames(clip), frames)


def test_sample_frame_indices():
    assert sample_frame_indices(10) == list(range(10))
    assert sample_frame_indices(10, num_frames=4) == [0, 1, 2, 3]
    assert sample_frame_indices(10, num_frames=4, stride=3) == [0, 3, 6, 9]
    assert sample_frame_indices(10, stride=4) == [0, 4, 8]
    assert sample_frame_indices(30, num_frames=5, source_fps=24, target_fps=8) == [0, 3, 6, 9, 12]
    assert sample_frame_indices(10, num_frames=3, source_fps=10, target_fps=4) == [0, 2, 5]
    assert sample_frame_indices(10, num_frames=2, stride=2, start=5) == [5, 7]
    with pytest.raises(DataError, match="10 frames"):
        sample_frame_indices(10, num_frames=4, stride=4)


def test_load_clip_sampling_and_resizing_shapes(tmp_path):
    clip = _random_clip(16, 48, 64)
    path = write_video(tmp_path / "a.mp4", clip, fps=16)
    assert load_clip(path, num_frames=5).shape == (3, 5, 48, 64)
    assert load_clip(path, stride=4).shape == (3, 4, 48, 64)
    by_fps = load_clip(path, num_frames=4, fps=4)
    assert torch.equal(by_fps, load_clip(path)[:, [0, 4, 8, 12]])
    assert load_clip(path, num_frames=4, height=32, width=32).shape == (3, 4, 32, 32)
    assert load_clip(path, height=20, width=90).shape == (3, 16, 20, 90)
    with pytest.raises(DataError, match="a.mp4"):
        load_clip(path, num_frames=17)


def test_resize_center_crop():
    clip = torch.randn(3, 2, 32, 48)
    # same scale: a pure center crop of the long side
    assert torch.equal(resize_center_crop(clip, 32, 32), clip[..., 8:40])
    assert torch.equal(resize_center_crop(clip, 32, 48), clip)
    # halving then cropping: the crop sits in the middle of the resized frames
    out = resize_center_crop(clip, 16, 16)
    ref = F.interpolate(clip.transpose(0, 1), size=(16, 24), mode="bilinear", antialias=True)
    assert torch.allclose(out, ref.transpose(0, 1)[..., 4:20])
    # a constant clip stays constant under resizing either way
    const = torch.full((3, 2, 10, 14), 0.25)
    for h, w in [(7, 7), (40, 30)]:
        assert torch.allclose(resize_center_crop(const, h, w), torch.full((3, 2, h, w), 0.25))


def test_first_frame_and_pil(tmp_path):
    clip = _random_clip(5, 32, 32)
    path = write_video(tmp_path / "a.mp4", clip)
    frame = first_frame(path)
    assert torch.equal(frame, load_clip(path)[:, 0])
    assert first_frame(path, 16, 16).shape == (3, 16, 16)
    assert to_pil_image(frame).size == (32, 32)


def test_bad_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_clip(tmp_path / "missing.mp4")
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    for reader in ("decord", "pyav", "auto"):
        with pytest.raises(DataError, match="fake.mp4"):
            load_clip(fake, reader=reader)
    with pytest.raises(DataError, match="fake.mp4"):
        verify_video(fake)


def test_pyav_reads_only_what_it_needs(tmp_path):
    clip = _random_clip(12, 32, 32, seed=3)
    path = write_video(tmp_path / "a.mp4", clip)
    frames, _ = read_frames(path, [9, 2, 2], reader="pyav")
    ref, _ = read_frames(path, None, reader="pyav")
    assert torch.equal(frames, ref[[9, 2, 2]])
    with pytest.raises(DataError, match="needs frame 12 but has 12 frames"):
        read_frames(path, [0, 12], reader="pyav")
    assert probe_video(path, "pyav") == verify_video(path)
