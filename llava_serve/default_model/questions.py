"""Questions and answers about a scene, in varied wording, for training and evaluation.

Each generator returns ``QA(kind, question, answer, target)``; ``target`` is what the evaluator
looks for in a model's answer (a colour, a shape, a count, a position, or the scene itself).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llava_serve.default_model.data import COLOURS, NUMBER_WORDS, SHAPES, Scene, Shape, describe, position_of

KINDS = ("colour", "shape", "count", "position", "describe")


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str
    target: Any


COLOUR_QUESTIONS = (
    "What colour is {ref}?",
    "What color is {ref}?",
    "What colour is {ref} in the picture?",
    "What color is {ref} in the image?",
    "What is the colour of {ref}?",
    "What is the color of {ref}?",
    "Which colour is {ref}?",
    "Tell me the colour of {ref}.",
    "what color is {ref}",
    "Can you tell me what color {ref} is?",
    "What colour is {ref} in the image?",
    "What color is {ref} in the picture?",
    "What colour does {ref} have?",
)
IT_COLOUR_QUESTIONS = (
    "What colour is it?",
    "What color is it?",
    "What colour is this?",
    "What color is this?",
    "What colour is the shape?",
    "What color is the shape?",
    "What colour is the object?",
    "What color is the shape in the picture?",
    "What colour is the shape in the image?",
    "what colour is it",
    "Which colour is the shape?",
    "What is the colour of the shape?",
    "What color is this shape?",
)
SHAPE_QUESTIONS = (
    "What shape is this?",
    "What shape is it?",
    "What is this shape?",
    "What shape is in the image?",
    "What shape is in the picture?",
    "What shape do you see?",
    "Which shape is this?",
    "What kind of shape is this?",
    "what shape is this",
    "What shape is shown?",
    "Name the shape.",
    "What is the shape in the image?",
    "What shape is the object?",
)
SHAPE_BY_COLOUR_QUESTIONS = (
    "What is the {c} shape?",
    "What shape is the {c} one?",
    "Which shape is {c}?",
    "What shape is {c}?",
    "What shape is the {c} object?",
    "What kind of shape is the {c} one?",
    "what is the {c} shape",
    "What is the {c} shape in the picture?",
    "Which shape is {c} in the image?",
)
COUNT_QUESTIONS = (
    "How many shapes are there?",
    "How many shapes are in the image?",
    "How many shapes are in the picture?",
    "How many objects are there?",
    "How many objects are in the image?",
    "Count the shapes.",
    "How many shapes do you see?",
    "how many shapes are there",
    "How many shapes can you see?",
    "What is the number of shapes?",
    "How many shapes are there in the picture?",
)
COUNT_KIND_QUESTIONS = (
    "How many {k}s are there?",
    "How many {k}s are in the image?",
    "How many {k}s do you see?",
)
POSITION_QUESTIONS = (
    "Where is {ref}?",
    "Where is {ref} in the image?",
    "Where is {ref} in the picture?",
    "Where is {ref} located?",
    "In which part of the image is {ref}?",
    "where is {ref}",
    "What is the position of {ref}?",
    "Where can you see {ref}?",
)
IT_POSITION_QUESTIONS = ("Where is it?", "Where is the shape?", "Where is the shape in the image?")
DESCRIBE_QUESTIONS = (
    "Describe the image.",
    "Describe the picture.",
    "Describe this image.",
    "What is in the image?",
    "What is in the picture?",
    "What do you see?",
    "What does the image show?",
    "Describe the image briefly.",
    "Give a short description of the image.",
    "describe the image",
    "What can you see in this picture?",
    "Describe what you see.",
    "What is shown in the image?",
)
POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}


def _unique_by(scene: Scene, attr: str) -> list[Shape]:
    values = [getattr(s, attr) for s in scene.shapes]
    return [s for s in scene.shapes if values.count(getattr(s, attr)) == 1]


def _ref(scene: Scene, shape: Shape, rng: random.Random) -> str:
    """A unique way to name ``shape``: 'the circle', 'the red shape' or 'the red circle'."""
    options = [f"the {shape.colour} {shape.kind}"]
    if shape in _unique_by(scene, "kind"):
        options += [f"the {shape.kind}"] * 2
    return rng.choice(options)


def colour_qa(scene: Scene, rng: random.Random) -> QA:
    if len(scene.shapes) == 1 and rng.random() < 0.5:
        shape = scene.shapes[0]
        return QA("colour", rng.choice(IT_COLOUR_QUESTIONS), f"It is {shape.colour}.", shape.colour)
    candidates = _unique_by(scene, "kind")
    if not candidates or rng.random() < 0.05:
        return _absent_colour_qa(scene, rng)
    shape = rng.choice(candidates)
    question = rng.choice(COLOUR_QUESTIONS).format(ref=f"the {shape.kind}")
    return QA("colour", question, f"The {shape.kind} is {shape.colour}.", shape.colour)


def _absent_colour_qa(scene: Scene, rng: random.Random) -> QA:
    missing = [k for k in SHAPES if k not in {s.kind for s in scene.shapes}]
    kind = rng.choice(missing)
    question = rng.choice(COLOUR_QUESTIONS).format(ref=f"the {kind}")
    return QA("absent", question, f"There is no {kind}.", None)


def shape_qa(scene: Scene, rng: random.Random) -> QA:
    if len(scene.shapes) == 1 and rng.random() < 0.5:
        shape = scene.shapes[0]
        return QA("shape", rng.choice(SHAPE_QUESTIONS), f"It is a {shape.kind}.", shape.kind)
    candidates = _unique_by(scene, "colour")
    if not candidates or rng.random() < 0.05:
        missing = [c for c in COLOURS if c not in {s.colour for s in scene.shapes}]
        colour = rng.choice(missing)
        question = rng.choice(SHAPE_BY_COLOUR_QUESTIONS).format(c=colour)
        return QA("absent", question, f"There is no {colour} shape.", None)
    shape = rng.choice(candidates)
    question = rng.choice(SHAPE_BY_COLOUR_QUESTIONS).format(c=shape.colour)
    return QA("shape", question, f"The {shape.colour} shape is a {shape.kind}.", shape.kind)


def count_qa(scene: Scene, rng: random.Random) -> QA:
    n = len(scene.shapes)
    if rng.random() < 0.25:
        kind = rng.choice(SHAPES)
        k = sum(s.kind == kind for s in scene.shapes)
        question = rng.choice(COUNT_KIND_QUESTIONS).format(k=kind)
        answer = f"There is one {kind}." if k == 1 else f"There are {NUMBER_WORDS[k] if k else 'no'} {kind}s."
        return QA("count_kind", question, answer, k)
    answer = "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
    return QA("count", rng.choice(COUNT_QUESTIONS), answer, n)


def position_qa(scene: Scene, rng: random.Random) -> QA:
    shape = rng.choice(scene.shapes)
    where = position_of(shape)
    if len(scene.shapes) == 1 and rng.random() < 0.3:
        question = rng.choice(IT_POSITION_QUESTIONS)
    else:
        question = rng.choice(POSITION_QUESTIONS).format(ref=_ref(scene, shape, rng))
    answer = f"The {shape.colour} {shape.kind} is {POSITION_PHRASES[where]}."
    return QA("position", question, answer, where)


def describe_qa(scene: Scene, rng: random.Random) -> QA:
    return QA("describe", rng.choice(DESCRIBE_QUESTIONS), describe(scene), scene)


GENERATORS: dict[str, Callable[[Scene, random.Random], QA]] = {
    "colour": colour_qa,
    "shape": shape_qa,
    "count": count_qa,
    "position": position_qa,
    "describe": describe_qa,
}


def random_qa(scene: Scene, rng: random.Random, weights: dict[str, float] | None = None) -> QA:
    weights = weights or {k: 1.0 for k in KINDS}
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    return GENERATORS[kind](scene, rng)
