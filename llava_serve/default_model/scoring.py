"""Scoring free-text answers: find the colour, shape, number, position or scene they state."""

from __future__ import annotations

import re
from collections import Counter

from llava_serve.default_model.data import COLOURS, NUMBER_WORDS, SHAPES, Scene

_WORD = re.compile(r"[a-z0-9]+")
_PAIR = re.compile(
    r"\b(?:(" + "|".join(NUMBER_WORDS) + r"|\d)\s+)?(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b"
)
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {str(i): i for i in range(10)} | {"no": 0}
_POSITION = {
    "top": ("v", "top"),
    "upper": ("v", "top"),
    "bottom": ("v", "bottom"),
    "lower": ("v", "bottom"),
    "left": ("h", "left"),
    "right": ("h", "right"),
}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("colour", "color"))


def stated_colours(text: str) -> set[str]:
    return {w for w in words(text) if w in COLOURS}


def stated_shapes(text: str) -> set[str]:
    return {w.removesuffix("s") for w in words(text) if w.removesuffix("s") in SHAPES}


def stated_number(text: str) -> int | None:
    return next((_NUMBERS[w] for w in words(text) if w in _NUMBERS), None)


def stated_position(text: str) -> str:
    """'top left', 'top', ..., 'center' ('middle'/'centre' count as center); '' if none is said."""
    found: dict[str, str] = {}
    for w in words(text):
        if w in _POSITION:
            axis, value = _POSITION[w]
            found.setdefault(axis, value)
    if found:
        return " ".join(found[a] for a in ("v", "h") if a in found)
    return "center" if {"center", "centre", "middle"} & set(words(text)) else ""


def stated_objects(text: str) -> Counter[str]:
    """'A red circle and two blue squares.' -> {'red circle': 1, 'blue square': 2}."""
    found: Counter[str] = Counter()
    for number, colour, shape in _PAIR.findall(text.lower().replace("colour", "color")):
        found[f"{colour} {shape}"] += _NUMBERS[number] if number else 1
    return found


def is_correct(kind: str, answer: str, target) -> bool:
    if kind == "colour":
        return stated_colours(answer) == {target}
    if kind == "shape":
        return stated_shapes(answer) == {target}
    if kind == "count":
        return stated_number(answer) == target
    if kind == "position":  # target: the accepted positions (data.positions_accepted), or one
        return stated_position(answer) in ({target} if isinstance(target, str) else target)
    if kind == "describe":
        return _describes(answer, target)
    raise ValueError(f"unknown question kind {kind!r}")


def _describes(answer: str, scene: Scene) -> bool:
    """Every shape named with its colour, and nothing else."""
    return stated_objects(answer) == Counter(s.name for s in scene.shapes)
