"""Motion fidelity: does the shape in a clip move the way its caption says?

The shape is tracked frame by frame as the centroid of its pixel mass (brightness above
the black background, or closeness to the caption's colour). Centroids are circular
means, so a shape wrapping around an edge keeps one centroid and displacements are
exact under translation. Each frame-to-frame displacement is compared with the one the
caption's rule (direction, speed, wrap or bounce) gives from where the shape is in the
first frame; a step scores exp(-err^2 / (2 (step / 2)^2)), and the clip's score is the
mean over steps: 1 is perfect, a still shape scores about 0.14, a reversed one about 0.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from videodpo.captions import COLOURS
from videodpo.data.synthetic import ClipRecord, render_clip, trajectory

TRACK_BY: tuple[str, ...] = ("intensity", "colour")


def shape_weights(clip: torch.Tensor, colour: str | None = None) -> torch.Tensor:
    """Per-pixel shape mass (F, H, W) of a (3, F, H, W) clip in [-1, 1]: brightness, or
    the likelihood of `colour`, above one half (so noise and background count for 0)."""
    img = (clip.detach().double().clamp(-1, 1) + 1) / 2
    if colour is None:
        score = img.max(dim=0).values
    else:
        target = torch.tensor(COLOURS[colour], dtype=img.dtype)[:, None, None, None]
        score = torch.where(target > 0.5, img, 1 - img).prod(dim=0)
    return (score - 0.5).clamp(min=0) * 2


def _circular_centroid(mass: torch.Tensor, length: int) -> torch.Tensor:
    """Circular mean position of mass (F, L) along a circle of `length` pixels."""
    angle = (torch.arange(length, dtype=mass.dtype) + 0.5) * (2 * math.pi / length)
    c = (mass * angle.cos()).sum(-1)
    s = (mass * angle.sin()).sum(-1)
    return torch.atan2(s, c).remainder(2 * math.pi) * (length / (2 * math.pi))


def track_centroids(
    clip: torch.Tensor, colour: str | None = None, min_mass: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (x, y) per frame, shape (F, 2), and whether the shape was found (F,)."""
    mass = shape_weights(clip, colour)  # (F, H, W)
    height, width = mass.shape[1:]
    x = _circular_centroid(mass.sum(1), width)
    y = _circular_centroid(mass.sum(2), height)
    found = mass.sum((1, 2)) >= min_mass
    return torch.stack([x, y], dim=-1), found


def _wrapped(delta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    size = torch.tensor([width, height], dtype=delta.dtype)
    return (delta + size / 2).remainder(size) - size / 2


def step_scores(clip: torch.Tensor, record: ClipRecord, by: str = "intensity") -> torch.Tensor:
    """Score in [0, 1] of every frame-to-frame step of `clip` against `record`, (F - 1,)."""
    if by not in TRACK_BY:
        raise ValueError(f"by must be one of {TRACK_BY}, got {by!r}")
    colour = record.colour if by == "colour" else None
    h, w = record.height, record.width
    centres, found = track_centroids(clip, colour)
    # The centroid of an asymmetric shape is not its centre: measure the offset once.
    template = replace(record, num_frames=1)
    template_centre, _ = track_centroids(render_clip(template), colour)
    offset = _wrapped(template_centre[0] - torch.tensor([record.x, record.y]), h, w)
    anchor = centres[0] - offset if found[0] else torch.tensor([record.x, record.y])
    expected = trajectory(replace(record, x=float(anchor[0]), y=float(anchor[1])))
    want = _wrapped(expected[1:] - expected[:-1], h, w)
    got = _wrapped(centres[1:] - centres[:-1], h, w)
    err2 = (got - want).pow(2).sum(-1)
    sigma = max(record.step, 1) / 2
    score = torch.exp(-err2 / (2 * sigma**2))
    return torch.where(found[1:] & found[:-1], score, torch.zeros_like(score))


def motion_fidelity(clip: torch.Tensor, record: ClipRecord, by: str = "intensity") -> float:
    """How well the motion in `clip` (3, F, H, W) in [-1, 1] matches `record`'s caption:
    mean step score in [0, 1], higher is better. `by="colour"` tracks only pixels of the
    caption's colour (a wrong colour then also scores low)."""
    if clip.shape[1] < 2:
        raise ValueError("motion needs at least two frames")
    return float(step_scores(clip, record, by).mean())
