"""The caption language of the synthetic world: its words, five slots, and the tokenizer.

A caption names a colour, a shape, a direction, a speed and an edge rule; a tiny model
embeds it as five slot ids of `CAPTION_VOCAB` (`videodpo.models.tiny.CaptionEncoder`),
the way a real model reads frozen T5 features. It sits apart from both the world
(`videodpo.data.synthetic`, which renders clips and writes captions) and the models, so
that neither imports the other.
"""

from __future__ import annotations

from common.errors import DataError

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
# (dx, dy) per frame in units of the step; y grows downwards (row index).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
SPEEDS: tuple[str, ...] = ("slow", "fast")
EDGE_RULES: tuple[str, ...] = ("wrap", "bounce")

PAD_TOKEN = "<pad>"
CAPTION_VOCAB: tuple[str, ...] = (
    PAD_TOKEN,
    *COLOURS,
    *SHAPES,
    *DIRECTIONS,
    *SPEEDS,
    *EDGE_RULES,
)
CAPTION_LENGTH = 5  # colour, shape, direction, speed, edge rule
_SLOTS: tuple[tuple[str, ...], ...] = (
    tuple(COLOURS),
    SHAPES,
    tuple(DIRECTIONS),
    SPEEDS,
    EDGE_RULES,
)
_SLOT_NAMES = ("colour", "shape", "direction", "speed", "edge rule")
_WORD_ALIASES = {"bouncing": "bounce", "wrapping": "wrap"}


def tokenize_caption(text: str) -> list[int]:
    """Ids in `CAPTION_VOCAB` of the five slots (colour, shape, direction, speed, edge
    rule) named in a caption; a caption naming no edge rule means "wrap"."""
    words = [w.strip(".,;:!?").lower() for w in text.split()]
    words = [_WORD_ALIASES.get(w, w) for w in words]
    tokens = []
    for slot, name in zip(_SLOTS, _SLOT_NAMES):
        found = [w for w in words if w in slot]
        if not found and name == "edge rule":
            found = ["wrap"]
        if len(found) != 1:
            raise DataError(f"caption {text!r} must name exactly one {name} of {slot}")
        tokens.append(CAPTION_VOCAB.index(found[0]))
    return tokens
