"""Questions and answers about a scene, in varied wording, for training and evaluation.

Each generator returns ``QA(kind, question, answer, target)``; ``target`` is what the evaluator
looks for in a model's answer (a colour, a shape, a count, a position, or the scene itself).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llava_serve.default_model.data import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    Scene,
    Shape,
    describe,
    position_of,
    positions_accepted,
)

KINDS = ("colour", "shape", "count", "position", "describe")
# Asked with no picture, any question gets this answer (a greeting, "who are you?", or a question
# about a picture that was not sent).
TEXT_ONLY_ANSWER = (
    "Hello! I am a small model for pictures of shapes. "
    "Send me a picture of shapes and ask about colour, shape, count or position."
)
TEXT_ONLY_QUESTIONS = (
    "Hello",
    "Hello!",
    "hello",
    "Hi",
    "Hi!",
    "hi",
    "Hey",
    "hey there",
    "Good morning",
    "Hello, how are you?",
    "Hi, who are you?",
    "Who are you?",
    "What are you?",
    "What is your name?",
    "What can you do?",
    "Help",
    "help",
    "How do I use this?",
    "What should I ask you?",
    "Tell me about yourself.",
    "Can you help me?",
    "Thanks",
    "Thank you!",
    "Are you there?",
    "test",
    "What is 2 + 2?",
    "Tell me a joke.",
    "What is the capital of France?",
    "Write a poem.",
    "What time is it?",
    "Can you see images?",
)


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
COLOUR_PLURAL_QUESTIONS = (
    "What colour are {ref}?",
    "What color are {ref}?",
    "What colour are {ref} in the picture?",
    "What is the colour of {ref}?",
    "what color are {ref}",
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
SHAPE_PLURAL_QUESTIONS = (
    "What are the {c} shapes?",
    "What shape are the {c} ones?",
    "Which shapes are {c}?",
    "What kind of shapes are the {c} ones?",
    "what are the {c} shapes",
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
    "How many {k}s are in the picture?",
    "how many {k}s are there",
    "Count the {k}s.",
    "How many {k}s can you see?",
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
COUNT_COLOUR_QUESTIONS = (
    "How many {c} shapes are there?",
    "How many {c} shapes do you see?",
    "How many {c} objects are there?",
    "how many {c} shapes are there",
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
    """A unique way to name ``shape`` (one whose colour and kind no other shape has):
    'the circle', 'the red shape' or 'the red circle'."""
    options = [f"the {shape.colour} {shape.kind}"]
    if shape in _unique_by(scene, "kind"):
        options += [f"the {shape.kind}"] * 2
    if shape in _unique_by(scene, "colour"):
        options += [f"the {shape.colour} shape"]
    return rng.choice(options)


def _plural(kind: str) -> str:
    return kind + "s"


def colour_qa(scene: Scene, rng: random.Random) -> QA:
    if len(scene.shapes) == 1 and rng.random() < 0.5:
        shape = scene.shapes[0]
        return QA("colour", rng.choice(IT_COLOUR_QUESTIONS), f"It is {shape.colour}.", shape.colour)
    candidates = _unique_by(scene, "kind")
    if rng.random() < 0.05:
        return _absent_colour_qa(scene, rng)
    if not candidates:  # every kind repeats: ask about one whose shapes all have one colour
        kinds = [k for k in {s.kind for s in scene.shapes} if len({s.colour for s in scene.shapes if s.kind == k}) == 1]
        if not kinds:
            return _absent_colour_qa(scene, rng)
        kind = rng.choice(sorted(kinds))
        colour = next(s.colour for s in scene.shapes if s.kind == kind)
        question = rng.choice(COLOUR_PLURAL_QUESTIONS).format(ref=f"the {_plural(kind)}")
        return QA("colour", question, f"The {_plural(kind)} are {colour}.", colour)
    shape = rng.choice(candidates)
    question = rng.choice(COLOUR_QUESTIONS).format(ref=f"the {shape.kind}")
    return QA("colour", question, f"The {shape.kind} is {shape.colour}.", shape.colour)


def _absent_colour_qa(scene: Scene, rng: random.Random) -> QA:
    missing = [k for k in SHAPES if k not in {s.kind for s in scene.shapes}]
    if not missing:
        return count_qa(scene, rng)
    kind = rng.choice(missing)
    question = rng.choice(COLOUR_QUESTIONS).format(ref=f"the {kind}")
    return QA("absent", question, f"There is no {kind}.", None)


def shape_qa(scene: Scene, rng: random.Random) -> QA:
    if len(scene.shapes) == 1 and rng.random() < 0.5:
        shape = scene.shapes[0]
        return QA("shape", rng.choice(SHAPE_QUESTIONS), f"It is a {shape.kind}.", shape.kind)
    candidates = _unique_by(scene, "colour")
    if not candidates and rng.random() < 0.8:  # every colour repeats: one whose shapes are all one kind
        colours = [
            c for c in {s.colour for s in scene.shapes} if len({s.kind for s in scene.shapes if s.colour == c}) == 1
        ]
        if colours:
            colour = rng.choice(sorted(colours))
            kind = next(s.kind for s in scene.shapes if s.colour == colour)
            question = rng.choice(SHAPE_PLURAL_QUESTIONS).format(c=colour)
            return QA("shape", question, f"The {colour} shapes are {_plural(kind)}.", kind)
    missing = [c for c in COLOURS if c not in {s.colour for s in scene.shapes}]
    if missing and (not candidates or rng.random() < 0.05):  # (six colours there: each one is unique)
        colour = rng.choice(missing)
        question = rng.choice(SHAPE_BY_COLOUR_QUESTIONS).format(c=colour)
        return QA("absent", question, f"There is no {colour} shape.", None)
    shape = rng.choice(candidates)
    question = rng.choice(SHAPE_BY_COLOUR_QUESTIONS).format(c=shape.colour)
    return QA("shape", question, f"The {shape.colour} shape is a {shape.kind}.", shape.kind)


def count_qa(scene: Scene, rng: random.Random) -> QA:
    n = len(scene.shapes)
    roll = rng.random()
    if roll < 0.25:  # "How many squares?" (one of the kinds there, mostly)
        present = sorted({s.kind for s in scene.shapes})
        kind = rng.choice(present) if rng.random() < 0.8 else rng.choice(SHAPES)
        k = sum(s.kind == kind for s in scene.shapes)
        return QA("count_kind", rng.choice(COUNT_KIND_QUESTIONS).format(k=kind), _there_are(k, kind), k)
    if roll < 0.35:  # "How many blue shapes?"
        colour = rng.choice(sorted({s.colour for s in scene.shapes}))
        k = sum(s.colour == colour for s in scene.shapes)
        question = rng.choice(COUNT_COLOUR_QUESTIONS).format(c=colour)
        return QA("count_colour", question, _there_are(k, f"{colour} shape"), k)
    return QA("count", rng.choice(COUNT_QUESTIONS), _there_are(n, "shape"), n)


def _there_are(k: int, noun: str) -> str:
    return f"There is one {noun}." if k == 1 else f"There are {NUMBER_WORDS[k] if k else 'no'} {noun}s."


def position_qa(scene: Scene, rng: random.Random) -> QA:
    names = [s.name for s in scene.shapes]
    unique = [s for s in scene.shapes if names.count(s.name) == 1]
    if not unique:  # every shape has a twin: there is no telling which one is meant
        return count_qa(scene, rng)
    shape = rng.choice(unique)
    where = position_of(shape)
    if len(scene.shapes) == 1 and rng.random() < 0.3:
        question = rng.choice(IT_POSITION_QUESTIONS)
    else:
        question = rng.choice(POSITION_QUESTIONS).format(ref=_ref(scene, shape, rng))
    answer = f"The {shape.colour} {shape.kind} is {POSITION_PHRASES[where]}."
    return QA("position", question, answer, positions_accepted(shape))


# Greetings of TEXT_ONLY_QUESTIONS that may open another of its questions ("Hey, what are you?").
GREETING_OPENINGS = ("Hello", "Hi", "Hey", "hey there", "Good morning", "hello", "hi")


def varied_text_question(rng: random.Random) -> str:
    """A text-only question of training's own lists, reworded: a greeting before it, its first letter or
    all of it in lower case, its end punctuation dropped or changed. Training's wording is fixed; people
    greet in other ways (the eval's held-out greetings are worded unlike training's)."""
    if rng.random() < 0.3:  # as text_only_qa: a question about a picture that is not there
        question = rng.choice(COUNT_QUESTIONS + DESCRIBE_QUESTIONS + SHAPE_QUESTIONS + IT_COLOUR_QUESTIONS)
    else:
        question = rng.choice(TEXT_ONLY_QUESTIONS)
    if rng.random() < 0.6 and question not in GREETING_OPENINGS:
        opening = rng.choice(GREETING_OPENINGS) + rng.choice((", ", "! ", " ", ". "))
        question = opening + question[0].lower() + question[1:]
    roll = rng.random()
    if roll < 0.2:
        question = question.lower()
    elif roll < 0.4:
        question = question.rstrip("?!.") + rng.choice(("", "?", "!", "??", " :)"))
    return question


def text_only_qa(rng: random.Random, varied: float = 0.0) -> QA:
    """A question with no picture sent: a greeting, or any other text; ``varied``: the chance it is
    reworded (varied_text_question). 0 draws exactly what training always drew."""
    if varied and rng.random() < varied:
        return QA("text", varied_text_question(rng), TEXT_ONLY_ANSWER, None)
    if rng.random() < 0.3:  # a question about a picture that is not there
        scene_question = rng.choice(COUNT_QUESTIONS + DESCRIBE_QUESTIONS + SHAPE_QUESTIONS + IT_COLOUR_QUESTIONS)
        return QA("text", scene_question, TEXT_ONLY_ANSWER, None)
    return QA("text", rng.choice(TEXT_ONLY_QUESTIONS), TEXT_ONLY_ANSWER, None)


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
