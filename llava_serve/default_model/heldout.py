"""Held-out evaluation pictures: shape scenes drawn by a different hand than training's.

Training draws its pictures with ``data.render``; this module is a separate renderer, used only by
``llava-serve eval --split heldout`` (training never imports it; a test checks that). It draws what
a person drawing in a paint program or a slide editor might: colours picked from common palettes
(MS Paint, CSS names, matplotlib's and Material's) rather than from training's hue ranges; equilateral
triangles, stars with other arm widths, squares with slightly rounded corners; filled, outlined
(1-10 px lines) or filled with a black outline, one style per picture; white, paper-like (noisy,
darkened at the corners), radial-gradient, pastel or dark tinted backgrounds; anti-aliased by
drawing at 4x and a Lanczos shrink, or aliased; often saved as JPEG (quality 10-85); image sizes
of 64 to 800 px, common photo and screen sizes among them; one to six shapes, smaller and larger
than training's, placed near the edges more often, overlapping more, repeats common.

The scenes are ``data.Scene`` values (centres and sizes as fractions of the image), so the same
questions and scoring apply; ``regression_cases`` are the fixed pictures of issue 15.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llava_serve.default_model.data import SHAPES, Scene, Shape

HELDOUT_SEED = 70_000  # training uses small seeds, the in-distribution eval 20000

PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((237, 28, 36), (255, 0, 0), (220, 20, 60), (214, 39, 40), (204, 0, 0), (234, 67, 53)),
    "orange": ((255, 127, 39), (255, 165, 0), (255, 140, 0), (255, 127, 14), (251, 140, 0), (245, 124, 0)),
    "yellow": ((255, 242, 0), (255, 255, 0), (255, 215, 0), (255, 235, 59), (250, 230, 30)),
    "green": ((34, 177, 76), (0, 128, 0), (50, 205, 50), (44, 160, 44), (0, 200, 83), (76, 175, 80), (0, 255, 0)),
    "blue": ((63, 72, 204), (0, 0, 255), (30, 144, 255), (31, 119, 180), (33, 150, 243), (0, 71, 171), (65, 105, 225)),
    "purple": ((163, 73, 164), (128, 0, 128), (148, 0, 211), (148, 103, 189), (156, 39, 176), (102, 51, 153)),
}
SIZES = ((64, 64), (100, 100), (128, 128), (224, 224), (256, 256), (300, 200), (320, 240), (400, 300),
         (480, 360), (512, 512), (600, 400), (640, 480), (200, 300), (360, 480), (800, 600), (720, 720))  # fmt: skip
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Style:
    """How one held-out picture is drawn."""

    background: str  # white, paper, radial, pastel, dark
    stroke: str  # fill, outline, outlined
    line: float  # outline width, fraction of the shorter image side
    anti_alias: bool
    jpeg_quality: int  # 0: saved losslessly
    star_inner: float
    corner: float  # square corner radius, fraction of the side


def sample_heldout_scene(rng: random.Random) -> Scene:
    """1-6 shapes (uniformly), sizes 9-60% of the shorter side, centres near the edges more often."""
    width, height = rng.choice(SIZES) if rng.random() < 0.7 else (rng.randint(64, 800), rng.randint(64, 800))
    if max(width, height) > 2 * min(width, height):  # keep within 1:2 (the model pads to a square)
        width = min(width, 2 * height)
        height = min(height, 2 * width)
    n = rng.randint(1, 6)
    shapes: list[Shape] = []
    repeat = n > 1 and rng.random() < 0.25
    for _ in range(400):
        if len(shapes) == n:
            break
        if shapes and repeat and rng.random() < 0.6:
            kind, colour = shapes[-1].kind, shapes[-1].colour
        else:
            kind, colour = rng.choice(SHAPES), rng.choice(list(PALETTES))
        size = rng.uniform(0.09, min(0.6, 0.95 / math.sqrt(n))) * min(width, height)
        w, h = size / width, size / height
        if rng.random() < 0.35:  # close to an edge
            cx = rng.choice((w / 2 + rng.uniform(0, 0.04), 1 - w / 2 - rng.uniform(0, 0.04)))
            cy = rng.uniform(h / 2, 1 - h / 2)
            if rng.random() < 0.5:
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.choice((h / 2 + rng.uniform(0, 0.04), 1 - h / 2))
        else:
            cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        angle = 0.0 if kind == "circle" else rng.uniform(-15, 15)
        shape = Shape(kind, colour, cx, cy, w, h, angle)
        if all(_box_overlap(shape, o, width, height) <= 0.35 for o in shapes):
            shapes.append(shape)
    if len(shapes) < n:
        return sample_heldout_scene(rng)
    return Scene(width, height, (255, 255, 255), tuple(shapes))


def _box_overlap(a: Shape, b: Shape, width: int, height: int) -> float:
    ix = max(0.0, min(a.cx + a.w / 2, b.cx + b.w / 2) - max(a.cx - a.w / 2, b.cx - b.w / 2)) * width
    iy = max(0.0, min(a.cy + a.h / 2, b.cy + b.h / 2) - max(a.cy - a.h / 2, b.cy - b.h / 2)) * height
    return ix * iy / (min(a.w * a.h, b.w * b.h) * width * height)


def sample_style(rng: random.Random) -> Style:
    return Style(
        background=rng.choices(("white", "paper", "radial", "pastel", "dark"), weights=(3, 2, 2, 2, 2))[0],
        stroke=rng.choices(("fill", "outline", "outlined"), weights=(5, 3, 2))[0],
        line=rng.uniform(0.006, 0.03),
        anti_alias=rng.random() < 0.5,
        jpeg_quality=rng.randint(10, 85) if rng.random() < 0.5 else 0,
        star_inner=rng.uniform(0.36, 0.52),
        corner=rng.uniform(0.0, 0.15),
    )


def render_heldout(scene: Scene, rng: random.Random, style: Style | None = None) -> Image.Image:
    style = style or sample_style(rng)
    k = SUPERSAMPLE if style.anti_alias else 1
    width, height = scene.width * k, scene.height * k
    image = _backdrop(style.background, scene.width, scene.height, rng).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    line = max(1, round(style.line * min(scene.width, scene.height))) * k
    for shape in scene.shapes:
        base = rng.choice(PALETTES[shape.colour])
        colour = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in base)
        if style.stroke == "fill":
            _draw(draw, shape, width, height, style, fill=colour, outline=None, line=0)
        elif style.stroke == "outline":
            _draw(draw, shape, width, height, style, fill=None, outline=colour, line=line)
        else:
            _draw(draw, shape, width, height, style, fill=colour, outline=(0, 0, 0), line=line)
    if k > 1:
        image = image.resize((scene.width, scene.height), Image.LANCZOS)
    if style.jpeg_quality:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=style.jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def _backdrop(kind: str, width: int, height: int, rng: random.Random) -> Image.Image:
    if kind == "white":
        return Image.new("RGB", (width, height), (255, 255, 255))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot(xs / width - 0.5, ys / height - 0.5) / math.sqrt(0.5)  # 0 centre, 1 corners
    if kind == "paper":
        base = np.array([rng.randint(235, 252), rng.randint(230, 248), rng.randint(215, 240)], np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (height, width, 3))
        pixels = base * (1 - 0.12 * radius[..., None] ** 2) + noise
    elif kind == "radial":
        inner = np.array([rng.randint(200, 255) for _ in range(3)], np.float32)
        outer = np.array([rng.randint(120, 230) for _ in range(3)], np.float32)
        pixels = inner * (1 - radius[..., None]) + outer * radius[..., None]
    elif kind == "pastel":
        hue = rng.random() * 2 * math.pi
        pixels = np.full((height, width, 3), [230 + 20 * math.cos(hue + i * 2.1) for i in range(3)], np.float32)
    else:  # dark, a little tinted: slate, navy, charcoal
        pixels = np.full(
            (height, width, 3), [rng.randint(15, 60), rng.randint(15, 60), rng.randint(20, 75)], np.float32
        )
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, width: int, height: int, style: Style, fill, outline, line: int):
    cx, cy, r = shape.cx * width, shape.cy * height, shape.w * width / 2
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=line)
        return
    if shape.kind == "square" and style.corner > 0 and abs(shape.angle) < 1:
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.rounded_rectangle(box, radius=style.corner * 2 * r, fill=fill, outline=outline, width=line)
        return
    if shape.kind == "square":
        points = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape.kind == "triangle":  # equilateral, centred on its centroid
        points = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    else:
        points = [
            ((r if i % 2 == 0 else style.star_inner * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
             (r if i % 2 == 0 else style.star_inner * r) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)
        ]  # fmt: skip
    a = math.radians(shape.angle)
    turned = [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in points]
    if outline is not None and fill is None:  # a closed line with joints, as a drawing program strokes it
        draw.line([*turned, turned[0], turned[1]], fill=outline, width=line, joint="curve")
    else:
        draw.polygon(turned, fill=fill)
        if outline is not None:
            draw.line([*turned, turned[0], turned[1]], fill=outline, width=line, joint="curve")


@dataclass(frozen=True)
class Case:
    """A fixed check from a bug report: a picture (or none), a question and what the answer must say."""

    name: str
    image: Image.Image | None
    question: str
    kind: str  # a question kind of scoring.is_correct, or "text" (a text-only answer)
    target: object


def regression_cases() -> list[Case]:
    """Issue 15's failures, drawn once: two blue squares, three blue circles, and no picture."""
    white = Style("white", "fill", 0.0, anti_alias=True, jpeg_quality=0, star_inner=0.45, corner=0.0)
    squares = Scene(400, 300, (255, 255, 255), (
        Shape("square", "blue", 0.3, 0.5, 0.25, 1 / 3),
        Shape("square", "blue", 0.7, 0.5, 0.25, 1 / 3),
    ))  # fmt: skip
    circles = Scene(400, 300, (255, 255, 255), (
        Shape("circle", "blue", 0.2, 0.45, 0.2, 4 / 15),
        Shape("circle", "blue", 0.5, 0.55, 0.2, 4 / 15),
        Shape("circle", "blue", 0.8, 0.45, 0.2, 4 / 15),
    ))  # fmt: skip
    two = render_heldout(squares, random.Random(1), white)
    three = render_heldout(circles, random.Random(2), white)
    return [
        Case("two blue squares", two, "How many squares are there?", "count", 2),
        Case("two blue squares", two, "How many shapes are there?", "count", 2),
        Case("two blue squares", two, "What colour are the squares?", "colour", "blue"),
        Case("three blue circles", three, "How many circles are there?", "count", 3),
        Case("three blue circles", three, "How many shapes are there?", "count", 3),
        Case("three blue circles", three, "What shape are the blue ones?", "shape", "circle"),
        Case("no image", None, "Hello, who are you?", "text", None),
        Case("no image", None, "What can you do?", "text", None),
    ]


# Text-only prompts for the eval's "no image" row, worded unlike training's list.
HELDOUT_GREETINGS = (
    "Hello, who are you?",
    "Good evening!",
    "hey, what's up?",
    "Hi there, what are you?",
    "What do you do?",
    "Can you help me with something?",
    "How does this work?",
    "hello?",
    "Yo",
    "Who made you?",
    "What is the weather today?",
    "Explain quantum physics.",
)
