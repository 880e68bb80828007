"""Synthetic scenes: one to three solid shapes on a plain light background, drawn with Pillow.

A scene is drawn from a seeded ``random.Random`` so that training and evaluation streams are
reproducible and disjoint (different seeds). Coordinates are fractions of the image width and
height, so the same scene can be rendered at any size and aspect ratio.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 220),
    "yellow": (240, 205, 25),
    "orange": (250, 135, 20),
    "purple": (135, 55, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
NUMBER_WORDS = ("zero", "one", "two", "three")
MIN_FRACTION, MAX_FRACTION = 0.15, 0.50  # shape size, as a fraction of the shorter image side
MAX_OVERLAP = 0.10  # of the smaller shape's bounding box
POSITIONS = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    cx: float  # centre, fraction of the width
    cy: float  # centre, fraction of the height
    w: float  # bounding-box width, fraction of the width
    h: float  # bounding-box height, fraction of the height
    angle: float = 0.0  # small rotation in degrees

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.w / 2, self.cy - self.h / 2, self.cx + self.w / 2, self.cy + self.h / 2)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def left_to_right(self) -> list[Shape]:
        return sorted(self.shapes, key=lambda s: (s.cx, s.cy))


def position_of(shape: Shape) -> str:
    """Coarse 3x3 position: 'top left', 'top', ..., 'center', ..., 'bottom right'."""
    horizontal = "left" if shape.cx < 1 / 3 else "right" if shape.cx > 2 / 3 else ""
    vertical = "top" if shape.cy < 1 / 3 else "bottom" if shape.cy > 2 / 3 else ""
    return " ".join(p for p in (vertical, horizontal) if p) or "center"


def describe(scene: Scene) -> str:
    """'A red circle.' / 'A red circle and a blue star.' / 'A red circle, a blue star and a green square.'"""
    names = [_article(s.name) + " " + s.name for s in scene.left_to_right()]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_canvas(rng: random.Random) -> tuple[int, int]:
    """Mostly square images of 64-384 px; a third are wide or tall (aspect 1:2 to 2:1)."""
    side = rng.randint(64, 384)
    if rng.random() < 2 / 3:
        return side, side
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    return (side, max(32, round(side / aspect))) if aspect > 1 else (max(32, round(side * aspect)), side)


def sample_background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(225, 255)
    return tuple(min(255, max(210, base + rng.randint(-12, 12))) for _ in range(3))  # type: ignore[return-value]


def sample_scene(rng: random.Random, n_shapes: int | None = None) -> Scene:
    """A scene with 1-3 shapes whose (colour, kind) pairs are distinct and that barely overlap."""
    width, height = sample_canvas(rng)
    n = n_shapes or rng.choices((1, 2, 3), weights=(0.4, 0.3, 0.3))[0]
    shapes: list[Shape] = []
    names: set[str] = set()
    while len(shapes) < n:
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if f"{colour} {kind}" in names:
            continue
        shape = _place(rng, kind, colour, width, height, shapes)
        shapes.append(shape)
        names.add(shape.name)
    return Scene(width, height, sample_background(rng), tuple(shapes))


def _place(rng: random.Random, kind: str, colour: str, width: int, height: int, others: list[Shape]) -> Shape:
    short = min(width, height)
    hi = MAX_FRACTION
    for attempt in range(200):
        if attempt and attempt % 40 == 0:
            hi = max(MIN_FRACTION, hi * 0.8)  # crowded: draw smaller shapes
        size = rng.uniform(MIN_FRACTION, hi) * short
        w, h = size / width, size / height
        shape = Shape(
            kind,
            colour,
            rng.uniform(w / 2, 1 - w / 2),
            rng.uniform(h / 2, 1 - h / 2),
            w,
            h,
            angle=rng.uniform(-10, 10) if kind != "circle" else 0.0,
        )
        if all(_overlap(shape, o, width, height) <= MAX_OVERLAP for o in others):
            return shape
    raise RuntimeError("could not place a shape without overlap")  # pragma: no cover


def _overlap(a: Shape, b: Shape, width: int, height: int) -> float:
    """Intersection of the bounding boxes over the smaller box's area."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    ix = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * width
    iy = max(0.0, min(ay1, by1) - max(ay0, by0)) * height
    smaller = min(a.w * a.h, b.w * b.h) * width * height
    return ix * iy / smaller


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Draw the scene; ``rng`` adds slight colour jitter so the model does not key on exact RGB."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fill = _jitter(COLOURS[shape.colour], rng)
        draw_shape(draw, shape, scene.width, scene.height, fill)
    return image


def _jitter(rgb: tuple[int, int, int], rng: random.Random | None) -> tuple[int, int, int]:
    if rng is None:
        return rgb
    return tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in rgb)  # type: ignore[return-value]


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, width: int, height: int, fill) -> None:
    cx, cy = shape.cx * width, shape.cy * height
    r = shape.w * width / 2
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    draw.polygon(polygon(shape.kind, cx, cy, r, shape.angle), fill=fill)


def polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        points = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif kind == "triangle":  # upright, filling its bounding box
        points = [(0.0, -r), (r, r), (-r, r)]
    elif kind == "star":  # five points; inner radius 0.45 keeps the arms visible at small sizes
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            theta = -math.pi / 2 + i * math.pi / 5
            points.append((radius * math.cos(theta), radius * math.sin(theta) + 0.1 * r))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]
