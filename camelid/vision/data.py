"""Scenes made offline: shapes of several colours, sizes and positions drawn with Pillow, with templated questions,
answers and captions, and a held-out split of combinations never seen in training.

A scene is 1-3 shapes in distinct cells of a 3x3 grid, no two of the same colour or the same shape, so "the
circle" or "the red shape" always names one. Six colour-shape pairs (HELD_OUT: every colour loses one shape)
never appear in a training scene; every held-out scene contains one of them, and its questions are about that
shape. A model answers them only if it has learnt colour and shape apart, not as memorised pairs.

Everything is drawn from a seed: a training example from (seed, step, index), so runs resume exactly, and the
held-out set from its own fixed seed, so every run is scored on the same questions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (235, 215, 45), "green": (40, 175, 65),
    "cyan": (40, 200, 210), "blue": (50, 90, 235), "purple": (150, 60, 210), "pink": (240, 125, 190),
    "brown": (135, 80, 35), "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
COUNTS = ("one", "two", "three")
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "cross"),
                      ("purple", "circle"), ("orange", "triangle")})
KINDS = ("colour", "shape", "size", "position", "count", "caption")
BACKGROUND = (16, 16, 16)
HELD_OUT_SEED = 20240925  # the held-out questions are the same in every run
SUPERSAMPLE = 4  # shapes are drawn at 4x and scaled down: smooth edges


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    cell: int  # 0..8, row by row
    dx: float = 0.0  # offset from the cell's centre, in cell widths
    dy: float = 0.0
    scale: float = 1.0  # of the size's radius
    angle: float = 0.0  # degrees
    tint: tuple[int, int, int] = (0, 0, 0)  # added to the colour


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    def render(self, size: int = 48) -> Image.Image:
        big = size * SUPERSAMPLE
        image = Image.new("RGB", (big, big), BACKGROUND)
        draw = ImageDraw.Draw(image)
        cell = big / 3
        for s in self.shapes:
            cx = (s.cell % 3 + 0.5 + s.dx) * cell
            cy = (s.cell // 3 + 0.5 + s.dy) * cell
            r = cell * (0.42 if s.size == "large" else 0.24) * s.scale
            fill = tuple(min(255, max(0, c + t)) for c, t in zip(COLOURS[s.colour], s.tint, strict=True))
            _draw(draw, s.shape, cx, cy, r, s.angle, fill)
        return image.resize((size, size), Image.Resampling.LANCZOS)

    def caption(self) -> str:
        """Its shapes in reading order: "a red circle, an orange square and a green cross"."""
        names = [f"{_article(s.colour)} {s.colour} {s.shape}" for s in sorted(self.shapes, key=lambda s: s.cell)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


OUTLINES = {  # corners around (0, 0) for a radius of 1
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0, -1), (1, 0.8), (-1, 0.8)],
    "cross": [(-1, -0.36), (-0.36, -0.36), (-0.36, -1), (0.36, -1), (0.36, -0.36), (1, -0.36), (1, 0.36),
              (0.36, 0.36), (0.36, 1), (-0.36, 1), (-0.36, 0.36), (-1, 0.36)],
}


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
          fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in OUTLINES[shape]], fill=fill)


@dataclass(frozen=True)
class Question:
    kind: str  # one of KINDS
    question: str
    answer: str


def ask(scene: Scene, kind: str, target: Shape) -> Question:
    """The question of `kind` about `target` (count and caption are about the whole scene)."""
    if kind == "colour":
        return Question(kind, f"What colour is the {target.shape}?", target.colour)
    if kind == "shape":
        return Question(kind, f"What shape is the {target.colour} one?", target.shape)
    if kind == "size":
        return Question(kind, f"Is the {target.shape} small or large?", target.size)
    if kind == "position":
        return Question(kind, f"Where is the {target.colour} {target.shape}?", CELLS[target.cell])
    if kind == "count":
        return Question(kind, "How many shapes are there?", COUNTS[len(scene.shapes) - 1])
    if kind == "caption":
        return Question(kind, "What is in the picture?", scene.caption())
    raise ValueError(f"unknown question kind {kind!r}")


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """Training scenes have no HELD_OUT pair; held-out scenes have exactly one, first in `shapes`."""
    n = int(rng.integers(1, 4))
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    pairs: list[tuple[str, str]] = []
    if held_out:  # one held-out pair, then the others from what is left
        pair = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
        pairs.append(pair)
        colours.remove(pair[0])
        shapes.remove(pair[1])
    while len(pairs) < n:  # a colour and a shape not used yet, never a held-out pair
        options = [(c, s) for c in colours for s in shapes if (c, s) not in HELD_OUT]
        c, s = options[int(rng.integers(len(options)))]
        pairs.append((c, s))
        colours.remove(c)
        shapes.remove(s)
    cells = rng.choice(len(CELLS), size=n, replace=False)
    return Scene(tuple(  # each drawn a little differently: position, size, angle and colour vary
        Shape(c, s, SIZES[int(rng.integers(2))], int(cell), dx=float(rng.uniform(-0.08, 0.08)),
              dy=float(rng.uniform(-0.08, 0.08)), scale=float(rng.uniform(0.85, 1.1)),
              angle=float(rng.uniform(-20, 20)), tint=tuple(int(t) for t in rng.integers(-15, 16, size=3)))
        for (c, s), cell in zip(pairs, cells, strict=True)
    ))


def training_example(rng: np.random.Generator) -> tuple[Scene, Question]:
    scene = random_scene(rng)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    return scene, ask(scene, kind, scene.shapes[int(rng.integers(len(scene.shapes)))])


def heldout_set(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[Scene, Question]]:
    """`n` questions on unseen combinations, the kinds in turn, each about a scene's held-out shape."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng, held_out=True)
        out.append((scene, ask(scene, KINDS[i % len(KINDS)], scene.shapes[0])))
    return out


def seen_set(n: int, seed: int = HELD_OUT_SEED + 1) -> list[tuple[Scene, Question]]:
    """`n` fresh questions from the training distribution (new scenes, combinations seen in training)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        out.append((scene, ask(scene, KINDS[i % len(KINDS)], scene.shapes[int(rng.integers(len(scene.shapes)))])))
    return out
