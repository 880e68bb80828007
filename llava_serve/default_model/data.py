"""Synthetic scenes for training: one to six shapes, drawn with Pillow in varied styles.

A scene is drawn from a seeded ``random.Random`` so that training and evaluation streams are
reproducible and disjoint (different seeds). Coordinates are fractions of the image width and
height, so the same scene can be rendered at any size and aspect ratio.

``render(scene, rng)`` varies the style as training needs it to (``rng=None``: the plain style,
solid fills of the reference colours on the scene's background): backgrounds light, dark, tinted
(pale or dark), linear or glowing gradients, or grainy; shapes filled, outlined (line widths vary)
or filled with a dark border, in any shade within their named colour (muted ones too), in varied
forms (stars' arm widths, triangles' proportions, squares' rounded corners); drawn aliased or
anti-aliased (supersampled 2-4x, shrunk with one of several filters), sometimes blurred or
JPEG-compressed. Shapes may overlap a little, sit against the edges, and repeat (two blue squares).
The held-out evaluation pictures come from a separate renderer (``heldout.py``) that this module
never calls.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 220),
    "yellow": (240, 205, 25),
    "orange": (250, 135, 20),
    "purple": (135, 55, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Hue ranges (degrees; red wraps around 0) of each named colour, for the shades training draws.
HUES: dict[str, tuple[float, float]] = {
    "red": (-15.0, 8.0),
    "orange": (20.0, 40.0),
    "yellow": (46.0, 62.0),
    "green": (88.0, 155.0),
    "blue": (196.0, 248.0),
    "purple": (262.0, 302.0),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_SHAPES = 6
N_SHAPES_WEIGHTS = (0.2, 0.17, 0.16, 0.16, 0.16, 0.15)  # of 1..6 shapes
MIN_FRACTION, MAX_FRACTION = 0.08, 0.60  # shape size, as a fraction of the shorter image side
MAX_OVERLAP = 0.3  # of the smaller shape's bounding box
SAME_SHARE = 0.1  # of the scenes of two or more shapes: all one kind and colour
MAX_ANGLE = 20.0  # rotation of squares, triangles and stars, degrees
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
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


POSITION_MARGIN = 0.04  # a centre this close to a third of the width or height may be called either side


def positions_accepted(shape: Shape) -> set[str]:
    """``position_of`` and, for a centre within ``POSITION_MARGIN`` of a grid line, the neighbouring cell
    across that line (the answers a person would accept; scoring uses this, training says ``position_of``)."""
    cxs = {shape.cx} | {shape.cx + d for d in (-POSITION_MARGIN, POSITION_MARGIN) if _crosses(shape.cx, d)}
    cys = {shape.cy} | {shape.cy + d for d in (-POSITION_MARGIN, POSITION_MARGIN) if _crosses(shape.cy, d)}
    return {position_of(Shape(shape.kind, shape.colour, x, y, shape.w, shape.h)) for x in cxs for y in cys}


def _crosses(value: float, delta: float) -> bool:
    return any((value - line) * (value + delta - line) < 0 for line in (1 / 3, 2 / 3))


def describe(scene: Scene) -> str:
    """'A red circle.' / 'A red circle and two blue stars.' / 'A red circle, a blue star and a green square.'

    Shapes are named left to right, a repeated colour and kind once with its number."""
    counts: dict[str, int] = {}
    for shape in scene.left_to_right():
        counts[shape.name] = counts.get(shape.name, 0) + 1
    names = [f"{_article(name)} {name}" if k == 1 else f"{NUMBER_WORDS[k]} {name}s" for name, k in counts.items()]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def max_fraction(n: int) -> float:
    """Largest shape size for a scene of ``n`` shapes (crowded scenes draw smaller shapes)."""
    return min(MAX_FRACTION, 0.9 / math.sqrt(n))


def sample_canvas(rng: random.Random) -> tuple[int, int]:
    """Mostly square images of 48-448 px (a tenth up to 640 px); a third are wide or tall (aspect 1:2 to 2:1)."""
    side = rng.randint(48, 448) if rng.random() < 0.9 else rng.randint(448, 640)
    if rng.random() < 2 / 3:
        return side, side
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    return (side, max(32, round(side / aspect))) if aspect > 1 else (max(32, round(side * aspect)), side)


def sample_background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(225, 255)
    return tuple(min(255, max(210, base + rng.randint(-12, 12))) for _ in range(3))  # type: ignore[return-value]


def sample_scene(rng: random.Random, n_shapes: int | None = None, same_share: float = SAME_SHARE) -> Scene:
    """A scene with 1-6 shapes that overlap at most a little; kinds and colours may repeat
    (``same_share`` of the scenes of two or more are all one kind and colour: "three blue circles")."""
    width, height = sample_canvas(rng)
    n = n_shapes or rng.choices(range(1, MAX_SHAPES + 1), weights=N_SHAPES_WEIGHTS)[0]
    same = n > 1 and rng.random() < same_share
    shapes: list[Shape] = []
    while len(shapes) < n:
        if shapes and (same or rng.random() < 0.15):  # a repeat of a shape already there
            first = shapes[0] if same else rng.choice(shapes)
            kind, colour = first.kind, first.colour
        else:
            kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        shape = _place(rng, kind, colour, width, height, shapes, max_fraction(n))
        if shape is None:  # too crowded: start again
            return sample_scene(rng, n, same_share)
        shapes.append(shape)
    return Scene(width, height, sample_background(rng), tuple(shapes))


def _place(
    rng: random.Random, kind: str, colour: str, width: int, height: int, others: list[Shape], hi: float
) -> Shape | None:
    short = min(width, height)
    for attempt in range(200):
        if attempt and attempt % 40 == 0:
            hi = max(MIN_FRACTION, hi * 0.8)  # crowded: draw smaller shapes
        size = rng.uniform(MIN_FRACTION, hi) * short
        w, h = size / width, size / height
        cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        if rng.random() < 0.2:  # against a side (pictures are often drawn to the edge)
            side = rng.randrange(4)
            cx = (w / 2, 1 - w / 2, cx, cx)[side]
            cy = (cy, cy, h / 2, 1 - h / 2)[side]
        angle = rng.uniform(-MAX_ANGLE, MAX_ANGLE) if kind != "circle" else 0.0
        shape = Shape(kind, colour, cx, cy, w, h, angle=angle)
        if all(_overlap(shape, o, width, height) <= MAX_OVERLAP for o in others):
            return shape
    return None


def _overlap(a: Shape, b: Shape, width: int, height: int) -> float:
    """Intersection of the bounding boxes over the smaller box's area."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    ix = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * width
    iy = max(0.0, min(ay1, by1) - max(ay0, by0)) * height
    smaller = min(a.w * a.h, b.w * b.h) * width * height
    return ix * iy / smaller


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Draw the scene; with ``rng``, in a random style (see the module's docstring)."""
    if rng is None:
        image = Image.new("RGB", (scene.width, scene.height), scene.background)
        draw = ImageDraw.Draw(image)
        for shape in scene.shapes:
            draw_shape(draw, shape, scene.width, scene.height, COLOURS[shape.colour])
        return image
    scale = rng.choice((2, 3, 4)) if rng.random() < 0.5 else 1  # anti-aliased: drawn larger, then shrunk
    scale = max(1, min(scale, 768 // max(scene.width, scene.height)))
    width, height = scene.width * scale, scene.height * scale
    image = _background(scene, rng, scene.width, scene.height)
    if scale > 1:
        image = image.resize((width, height), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    style = rng.choices(("fill", "outline", "bordered"), weights=(0.55, 0.25, 0.2))[0]
    form = sample_form(rng)
    thin_border = rng.random() < 0.5
    for shape in scene.shapes:
        fill = shade(shape.colour, rng)
        size = shape.w * width
        line = max(1, round(size * rng.uniform(0.03, 0.15)))
        if style == "outline" or (style == "fill" and rng.random() < 0.05):
            draw_shape(draw, shape, width, height, None, outline=fill, line=line, form=form)
        elif style == "bordered":
            border = tuple(rng.randint(0, 60) for _ in range(3))
            draw_shape(
                draw,
                shape,
                width,
                height,
                fill,
                outline=border,
                line=max(1, line // 2 if thin_border else line),
                form=form,
            )
        else:
            draw_shape(draw, shape, width, height, fill, form=form)
    if scale > 1:  # each pixel a weighted mean of the drawn pixels under it, with one of Pillow's filters
        shrink = rng.choice((Image.Resampling.BOX, Image.Resampling.HAMMING, Image.Resampling.LANCZOS))
        image = image.resize((scene.width, scene.height), shrink)
    if rng.random() < 0.15:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if rng.random() < 0.45:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(8, 92))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """A random shade within a named colour: hue in its range, strong saturation, not too dark."""
    lo, hi = HUES[colour]
    hue = (rng.uniform(lo, hi) % 360) / 360
    value_lo = 0.45 if colour in ("purple", "blue", "green") else 0.7
    value_hi = 0.85 if colour == "purple" else 1.0  # a bright purple is pink
    saturation_lo = 0.7 if colour in ("yellow", "orange") else 0.42
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(saturation_lo, 1.0), rng.uniform(value_lo, value_hi))
    return round(r * 255), round(g * 255), round(b * 255)


def _background(scene: Scene, rng: random.Random, width: int, height: int) -> Image.Image:
    """Plain (the scene's light colour, any grey, a pale tint), a gradient, or with noise."""

    def plain() -> tuple[int, int, int]:
        kind = rng.random()
        if kind < 0.5:
            return scene.background
        if kind < 0.75:
            grey = rng.choice((rng.randint(0, 80), rng.randint(80, 255)))
            return (grey, grey, grey)
        if rng.random() < 0.3:  # a dark tint: navy, slate, dark teal
            r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.15, 0.6), rng.uniform(0.08, 0.35))
        else:
            r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.03, 0.2), rng.uniform(0.8, 1.0))
        return round(r * 255), round(g * 255), round(b * 255)

    first = plain()
    kind = rng.random()
    if kind < 0.5:
        return Image.new("RGB", (width, height), first)
    if kind < 0.82:  # a gradient between two plain colours: linear in a random direction, or a glow
        second = np.array(plain(), dtype=np.float32)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        xs, ys = xs / max(1, width), ys / max(1, height)
        if kind < 0.65:
            angle = rng.uniform(0, 2 * math.pi)
            t = xs * math.cos(angle) + ys * math.sin(angle)
        else:  # from a point near the middle outwards
            t = np.hypot(xs - rng.uniform(0.3, 0.7), ys - rng.uniform(0.3, 0.7)) ** rng.uniform(1.0, 2.0)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        pixels = np.array(first, dtype=np.float32) * (1 - t[..., None]) + second * t[..., None]
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    channels = rng.choice((1, 3))  # grey grain or coloured grain
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(3, 20), (height, width, channels))
    pixels = np.array(first, dtype=np.float32) + noise
    return Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).clip(0, 255).astype(np.uint8))


@dataclass(frozen=True)
class Form:
    """How one picture draws each kind (the vision stage's labels use the plain form: a few pixels apart)."""

    star_inner: float = 0.45  # inner radius of a star, fraction of the outer
    triangle: float = 0.0  # 0: apex and base corners on its box; 1: base raised and narrowed (equilateral)
    corner: float = 0.0  # radius of a square's rounded corners, fraction of its half side


PLAIN = Form()


def sample_form(rng: random.Random) -> Form:
    corner = rng.uniform(0.05, 0.4) if rng.random() < 0.3 else 0.0
    return Form(rng.uniform(0.34, 0.56), rng.random() if rng.random() < 0.6 else 0.0, corner)


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: Shape,
    width: int,
    height: int,
    fill,
    outline=None,
    line: int = 1,
    form: Form = PLAIN,
) -> None:
    cx, cy = shape.cx * width, shape.cy * height
    r = shape.w * width / 2
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=line)
        return
    draw.polygon(polygon(shape.kind, cx, cy, r, shape.angle, form), fill=fill, outline=outline, width=line)


def polygon(kind: str, cx: float, cy: float, r: float, angle: float, form: Form = PLAIN) -> list[tuple[float, float]]:
    if kind == "square":
        points = _rounded_square(r, form.corner)
    elif kind == "triangle":  # upright; apex on top
        base, half = r * (1 - 0.5 * form.triangle), r * (1 - 0.134 * form.triangle)
        points = [(0.0, -r), (half, base), (-half, base)]
    elif kind == "star":  # five points; the default inner radius 0.45 keeps the arms visible at small sizes
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else form.star_inner * r
            theta = -math.pi / 2 + i * math.pi / 5
            points.append((radius * math.cos(theta), radius * math.sin(theta) + 0.1 * r))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _rounded_square(r: float, corner: float) -> list[tuple[float, float]]:
    if corner <= 0:
        return [(-r, -r), (r, -r), (r, r), (-r, r)]
    c, points = corner * r, []
    for sx, sy, start in ((1, -1, -90), (1, 1, 0), (-1, 1, 90), (-1, -1, 180)):  # corners clockwise
        ox, oy = sx * (r - c), sy * (r - c)
        points += [
            (ox + c * math.cos(math.radians(start + t)), oy + c * math.sin(math.radians(start + t)))
            for t in (0, 30, 60, 90)
        ]
    return points
