"""Synthetic video world: one coloured shape on black, moving by a captioned rule.

A `ClipRecord` holds everything about a clip (shape, colour, direction, speed, bounce,
start, size, canvas). `render_clip` draws it as a (3, F, H, W) tensor in [-1, 1];
`caption` describes it in words and `caption_tokens` as five ids of `CAPTION_VOCAB`
(colour, shape, direction, speed, edge rule), so a tiny model can embed a caption as a
few tokens. Without bounce the world wraps around (a torus) and the shape never stops;
with bounce it reflects off the walls. Motion is made easy to see: high contrast, four
directions, whole pixels per frame (`fast_step` of 4 moves one 4x4 patch a frame).
Everything is deterministic by seed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace

import torch

from common.errors import DataError
from videodpo.captions import COLOURS, DIRECTIONS, SHAPES, SPEEDS, tokenize_caption


@dataclass
class WorldConfig:
    """What the sampler may draw. Steps are pixels per frame."""

    height: int = 16
    width: int = 16
    num_frames: int = 8
    shape_size: int = 6
    slow_step: int = 2
    fast_step: int = 4
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    directions: tuple[str, ...] = tuple(DIRECTIONS)
    speeds: tuple[str, ...] = SPEEDS
    bounce_prob: float = 0.0
    fps: float = 8.0
    start_grid: int = 1  # the shape's top-left corner starts on multiples of this many pixels

    def step_of(self, speed: str) -> int:
        return {"slow": self.slow_step, "fast": self.fast_step}[speed]


@dataclass
class ClipRecord:
    """One clip of the world; `x`, `y` are the shape's centre at frame 0 in pixels
    (pixel `j` covers [j, j + 1))."""

    shape: str
    colour: str
    direction: str
    speed: str
    bounce: bool
    step: int
    size: int
    x: float
    y: float
    height: int
    width: int
    num_frames: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClipRecord:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise DataError(f"synthetic record is missing {sorted(missing)}: {data}")
        return cls(**{k: data[k] for k in names})


def caption(record: ClipRecord) -> str:
    """The caption in words; `tokenize_caption(caption(r)) == caption_tokens(r)`."""
    edges = "bouncing off" if record.bounce else "wrapping around"
    return (
        f"a {record.colour} {record.shape} moving {record.direction} "
        f"at {record.speed} speed, {edges} the edges"
    )


def caption_tokens(record: ClipRecord) -> list[int]:
    """Five ids in `CAPTION_VOCAB`: colour, shape, direction, speed, edge rule."""
    return tokenize_caption(caption(record))


def _fold(p: float, lo: float, hi: float) -> float:
    """Position after reflecting off walls at `lo` and `hi` (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return lo
    q = (p - lo) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


def trajectory(record: ClipRecord) -> torch.Tensor:
    """Centre (x, y) of the shape at every frame, shape (F, 2)."""
    dx, dy = DIRECTIONS[record.direction]
    half = record.size / 2
    out = []
    for f in range(record.num_frames):
        x = record.x + dx * record.step * f
        y = record.y + dy * record.step * f
        if record.bounce:
            x = _fold(x, half, record.width - half)
            y = _fold(y, half, record.height - half)
        else:
            x %= record.width
            y %= record.height
        out.append((x, y))
    return torch.tensor(out, dtype=torch.float64)


def _wrapped_offsets(centre: float, length: int) -> torch.Tensor:
    """Signed distance from every pixel centre to `centre` on a circle of `length`."""
    d = torch.arange(length, dtype=torch.float64) + 0.5 - centre
    return (d + length / 2) % length - length / 2


def shape_mask(shape: str, size: int, x: float, y: float, height: int, width: int) -> torch.Tensor:
    """Boolean (H, W) mask of a shape centred at (x, y), wrapping at the edges."""
    dx = _wrapped_offsets(x, width)[None, :]
    dy = _wrapped_offsets(y, height)[:, None]
    half = size / 2
    if shape == "square":
        return (dx.abs() < half) & (dy.abs() < half)
    if shape == "circle":
        return dx**2 + dy**2 < 0.9 * half**2
    if shape == "triangle":  # apex up, base at the bottom
        return (dy.abs() < half) & (dx.abs() < (dy + half) / 2 + 0.5)
    raise DataError(f"unknown shape {shape!r}, expected one of {SHAPES}")


def render_clip(record: ClipRecord) -> torch.Tensor:
    """The clip as float32 (3, F, H, W) in [-1, 1]: the shape in its colour on black."""
    colour = torch.tensor(COLOURS[record.colour], dtype=torch.float32)
    frames = []
    for x, y in trajectory(record).tolist():
        mask = shape_mask(record.shape, record.size, x, y, record.height, record.width)
        frames.append(mask.float()[None] * colour[:, None, None])
    clip = torch.stack(frames, dim=1)  # (3, F, H, W) in [0, 1]
    return clip * 2 - 1


def _start_positions(world: WorldConfig, bounce: bool, length: int) -> list[float]:
    """Centres on the pixel grid (whole for even sizes, half for odd ones) whose shape's
    top-left corner lies on a multiple of `world.start_grid` pixels."""
    offset = 0.5 * (world.shape_size % 2)
    half = world.shape_size / 2
    centres = [k + offset for k in range(length + 1)]
    if not bounce:
        centres = [c for c in centres if c < length]
    else:
        centres = [c for c in centres if half <= c <= length - half]
    return [c for c in centres if (c - half) % world.start_grid == 0]


def sample_records(world: WorldConfig, num_clips: int, seed: int) -> list[ClipRecord]:
    """`num_clips` records drawn uniformly from `world`; the same seed, the same list."""
    if world.shape_size > min(world.height, world.width):
        raise DataError(f"shape_size {world.shape_size} does not fit {world.height}x{world.width}")
    rng = random.Random(seed)
    records = []
    for _ in range(num_clips):
        bounce = rng.random() < world.bounce_prob
        speed = rng.choice(world.speeds)
        records.append(
            ClipRecord(
                shape=rng.choice(world.shapes),
                colour=rng.choice(world.colours),
                direction=rng.choice(world.directions),
                speed=speed,
                bounce=bounce,
                step=world.step_of(speed),
                size=world.shape_size,
                x=rng.choice(_start_positions(world, bounce, world.width)),
                y=rng.choice(_start_positions(world, bounce, world.height)),
                height=world.height,
                width=world.width,
                num_frames=world.num_frames,
            )
        )
    return records


def render_batch(records: list[ClipRecord]) -> torch.Tensor:
    """Clips of several records stacked as (N, 3, F, H, W)."""
    return torch.stack([render_clip(r) for r in records])


def miscaptioned(records: list[ClipRecord], wrong_share: float, seed: int) -> list[str]:
    """Captions of `records` where a `wrong_share` of them (drawn by `seed`) name another
    direction than the one the clip moves in: the noisy captions of a scraped dataset.
    The clips themselves are untouched; render them from `records`."""
    if not 0.0 <= wrong_share <= 1.0:
        raise DataError(f"wrong_share must lie in [0, 1], got {wrong_share}")
    rng = random.Random(f"miscaptioned/{seed}")
    out = []
    for record in records:
        if rng.random() < wrong_share:
            others = [d for d in DIRECTIONS if d != record.direction]
            record = replace(record, direction=rng.choice(others))
        out.append(caption(record))
    return out
