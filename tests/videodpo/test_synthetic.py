"""Synthetic world: determinism, rendering against plain pixel arithmetic, captions,
the dataset writer, and the motion-fidelity metric's ordering."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from common.errors import DataError
from tests.videodpo.synthetic_clips import write_dataset
from videodpo.captions import CAPTION_LENGTH, CAPTION_VOCAB, COLOURS, DIRECTIONS, tokenize_caption
from videodpo.data.motion import motion_fidelity, track_centroids
from videodpo.data.synthetic import (
    ClipRecord,
    WorldConfig,
    caption,
    caption_tokens,
    render_clip,
    sample_records,
)
from videodpo.data.video_io import load_clip


def _record(**kw) -> ClipRecord:
    base = dict(
        shape="square",
        colour="red",
        direction="right",
        speed="fast",
        bounce=False,
        step=4,
        size=6,
        x=8.0,
        y=8.0,
        height=16,
        width=16,
        num_frames=8,
    )
    base.update(kw)
    return ClipRecord(**base)


def test_sampling_is_deterministic_by_seed():
    world = WorldConfig(bounce_prob=0.5)
    a, b = sample_records(world, 20, seed=3), sample_records(world, 20, seed=3)
    assert a == b
    assert a != sample_records(world, 20, seed=4)
    assert {r.bounce for r in a} == {True, False}
    assert torch.equal(render_clip(a[0]), render_clip(b[0]))


@pytest.mark.parametrize("bounce_prob", [0.0, 1.0])
def test_start_grid_aligns_the_shape_with_patches(bounce_prob):
    world = WorldConfig(shape_size=4, start_grid=4, bounce_prob=bounce_prob, shapes=("square",),
                        speeds=("fast",))
    records = sample_records(world, 200, seed=0)
    corners = {(r.x - 2, r.y - 2) for r in records}
    assert corners == {(float(x), float(y)) for x in (0, 4, 8, 12) for y in (0, 4, 8, 12)}
    for r in records:  # a shape on the grid stepping a whole patch stays on the grid
        clip = (render_clip(r) + 1) / 2
        for frame in clip.unbind(1):
            mass = frame.amax(0).view(4, 4, 4, 4).sum((1, 3))  # pixels per 4x4 patch
            assert sorted(mass[mass > 0].tolist()) == [16.0]


def test_render_values_and_shape():
    r = _record(colour="yellow")
    clip = render_clip(r)
    assert clip.shape == (3, 8, 16, 16) and clip.dtype == torch.float32
    on = clip[0] > 0  # yellow = red + green, no blue
    assert torch.equal(on, clip[1] > 0) and (clip[2] == -1).all()
    assert set(clip.unique().tolist()) == {-1.0, 1.0}
    counts = on.sum((1, 2))
    assert (counts == 36).all()  # a 6x6 square in every frame


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_wrap_motion_is_a_roll_of_the_first_frame(direction):
    r = _record(direction=direction, speed="slow", step=2, shape="triangle", x=3.0, y=13.0)
    clip = render_clip(r)
    dx, dy = DIRECTIONS[direction]
    for f in range(r.num_frames):
        rolled = torch.roll(clip[:, 0], shifts=(dy * 2 * f, dx * 2 * f), dims=(1, 2))
        assert torch.equal(clip[:, f], rolled), f


def test_bounce_stays_inside_and_reverses():
    r = _record(bounce=True, x=9.0, y=5.0, direction="right", num_frames=12)
    clip = render_clip(r)
    xs = []
    for f in range(r.num_frames):
        ys_idx, xs_idx = torch.nonzero(clip[0, f] > 0, as_tuple=True)
        # the 6x6 square is one unbroken block: never split across an edge
        assert xs_idx.max() - xs_idx.min() == 5 and ys_idx.max() - ys_idx.min() == 5
        xs.append(xs_idx.float().mean().item() + 0.5)
    steps = torch.tensor(xs).diff()
    assert steps[0] > 0 and (steps < 0).any()  # starts right, comes back
    assert steps.abs().max() <= 4


def test_caption_tokens_name_the_record():
    for r in sample_records(WorldConfig(bounce_prob=0.5), 30, seed=1):
        tokens = caption_tokens(r)
        assert len(tokens) == CAPTION_LENGTH
        words = [CAPTION_VOCAB[t] for t in tokens]
        assert words == [r.colour, r.shape, r.direction, r.speed, "bounce" if r.bounce else "wrap"]
        assert tokenize_caption(caption(r)) == tokens
    assert CAPTION_VOCAB[0] == "<pad>" and len(set(CAPTION_VOCAB)) == len(CAPTION_VOCAB)
    assert tokenize_caption("a blue circle moving up at slow speed")[-1] == CAPTION_VOCAB.index(
        "wrap"
    )
    with pytest.raises(DataError, match="colour"):
        tokenize_caption("a circle moving up at slow speed")


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_write_dataset_round_trip(tmp_path, reader):
    world = WorldConfig(height=16, width=32, num_frames=8, bounce_prob=0.5)
    manifest = write_dataset(tmp_path, world, num_clips=4, seed=0)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 4
    for row, r in zip(rows, sample_records(world, 4, seed=0)):
        assert row["video"].startswith("clips/") and row["caption"] == caption(r)
        assert ClipRecord.from_dict(row["world"]) == r
        clip = load_clip(tmp_path / row["video"], reader=reader)
        assert clip.shape == (3, 8, 16, 32)
        assert (clip - render_clip(r)).abs().max() <= 2 / 127.5 + 1e-6


def test_track_centroids_matches_pixel_mean():
    r = _record(bounce=True, shape="circle", x=5.0, y=10.0, colour="green")
    clip = render_clip(r)
    centres, found = track_centroids(clip)
    assert found.all()
    for f in range(r.num_frames):
        ys, xs = torch.nonzero(clip[1, f] > 0, as_tuple=True)
        ref = torch.tensor([xs.double().mean() + 0.5, ys.double().mean() + 0.5])
        assert torch.allclose(centres[f], ref, atol=1e-9)


def test_motion_fidelity_ordering():
    gen = torch.Generator().manual_seed(0)
    records = sample_records(WorldConfig(), 16, seed=7)  # wrap world: reversal is wrong
    scores: dict[str, list[float]] = {
        k: [] for k in ("clean", "noisy", "shuffled", "still", "reversed", "wrong")
    }
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for r in records:
        clip = render_clip(r)
        perm = torch.randperm(r.num_frames, generator=gen)
        while torch.equal(perm, torch.arange(r.num_frames)):
            perm = torch.randperm(r.num_frames, generator=gen)
        noise = 0.25 * torch.randn(clip.shape, generator=gen)
        scores["clean"].append(motion_fidelity(clip, r))
        scores["noisy"].append(motion_fidelity((clip + noise).clamp(-1, 1), r))
        scores["shuffled"].append(motion_fidelity(clip[:, perm], r))
        scores["still"].append(motion_fidelity(clip[:, :1].expand_as(clip), r))
        scores["reversed"].append(motion_fidelity(clip.flip(1), r))
        scores["wrong"].append(motion_fidelity(clip, replace(r, direction=opposite[r.direction])))
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    assert min(scores["clean"]) > 0.999
    assert 0.9 < mean["noisy"] < mean["clean"]
    for bad in ("shuffled", "still", "reversed", "wrong"):
        assert mean[bad] < 0.5, (bad, mean)
    assert all(c > s for c, s in zip(scores["clean"], scores["shuffled"]))
    assert mean["reversed"] < mean["still"]  # going backwards is worse than standing still


def test_motion_fidelity_colour_tracking_and_bounce():
    r = _record(bounce=True, direction="up", x=8.0, y=4.0, colour="blue")
    clip = render_clip(r)
    assert motion_fidelity(clip, r, by="colour") > 0.999
    # the same motion in the wrong colour is invisible to colour tracking
    red = render_clip(replace(r, colour="red"))
    assert motion_fidelity(red, r, by="intensity") > 0.999
    assert motion_fidelity(red, r, by="colour") == 0.0
    assert set(COLOURS) >= {"red", "blue"}


def test_miscaptioned_names_a_wrong_direction_in_about_the_given_share():
    from videodpo.data.synthetic import miscaptioned

    world = WorldConfig(height=8, width=8, num_frames=4, shape_size=4)
    records = sample_records(world, 2000, seed=3)
    captions = miscaptioned(records, 0.4, seed=3)
    assert captions == miscaptioned(records, 0.4, seed=3)
    direction_slot = 2
    wrong = 0
    for record, text in zip(records, captions):
        named = tokenize_caption(text)
        true = caption_tokens(record)
        # only the direction may differ, and when it does it names another direction
        assert named[:direction_slot] + named[direction_slot + 1:] == true[:direction_slot] + true[direction_slot + 1:]
        if named != true:
            wrong += 1
            assert text != caption(record) and text.split()[4] in DIRECTIONS
    assert abs(wrong / len(records) - 0.4) < 0.04
    assert miscaptioned(records, 0.0, seed=3) == [caption(r) for r in records]
    with pytest.raises(DataError, match="wrong_share"):
        miscaptioned(records, 1.5, seed=3)
