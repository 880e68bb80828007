"""The shipped checkpoint: loads with plain transformers, offline, and answers fresh pictures right."""

from __future__ import annotations

import os

import pytest
import torch

from llava_serve.default_model import default_model_path
from llava_serve.default_model.batches import answer_labels, conversation
from llava_serve.default_model.data import Scene, Shape, render
from llava_serve.default_model.eval import score
from llava_serve.default_model.heldout import regression_cases
from llava_serve.default_model.questions import QA

WEIGHTS = default_model_path()
pytestmark = pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="no shipped weights")
LIGHT = (246, 244, 240)


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    processor = AutoProcessor.from_pretrained(WEIGHTS)
    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS).eval()
    return model, processor


def ask(loaded, image, question: str) -> str:
    model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def one(kind: str, colour: str, cx: float = 0.5, cy: float = 0.5, size: float = 0.4, w: int = 240, h: int = 240):
    short = min(w, h)
    shape = Shape(kind, colour, cx, cy, size * short / w, size * short / h)
    return Scene(w, h, LIGHT, (shape,))


def test_checkpoint_is_small_and_loads_as_float32(loaded) -> None:
    model, _ = loaded
    assert model.dtype == torch.float32
    assert sum(f.stat().st_size for f in WEIGHTS.iterdir()) < 15 * 1024 * 1024
    assert model.generation_config.eos_token_id == model.config.text_config.eos_token_id


def test_prompt_is_vicuna_and_image_expands_to_one_token_per_patch(loaded) -> None:
    model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert prompt.endswith(" USER: <image>\nWhat is it? ASSISTANT:")
    inputs = processor(text=prompt, images=[render(one("circle", "red"))], return_tensors="pt")
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == grid * grid
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_loss_mask_covers_only_the_answers(loaded) -> None:
    _, processor = loaded
    turns = [QA("colour", "What colour is it?", "It is red.", "red"), QA("count", "How many?", "One.", 1)]
    image = render(one("circle", "red"))
    inputs = processor(text=processor.apply_chat_template(conversation(turns)), images=[image], return_tensors="pt")
    labels = answer_labels(inputs["input_ids"], inputs["attention_mask"], processor)
    assert processor.tokenizer.decode(labels[labels >= 0]) == " It is red.</s> One.</s>"


def test_a_red_circle_is_red(loaded) -> None:
    answer = ask(loaded, render(one("circle", "red")), "What colour is it?")
    assert "red" in answer.lower(), answer


@pytest.mark.parametrize(
    ("scene", "question", "expected"),
    [
        (one("square", "blue", cx=0.3, cy=0.6, size=0.35), "What shape is this?", "square"),
        (one("star", "yellow", size=0.45, w=320, h=200), "What shape is this?", "star"),
        (one("triangle", "green", cx=0.7, cy=0.3, size=0.3), "What color is the triangle?", "green"),
        (one("circle", "purple", size=0.3, w=160, h=260), "What colour is the shape?", "purple"),
    ],
)
def test_single_shapes(loaded, scene: Scene, question: str, expected: str) -> None:
    answer = ask(loaded, render(scene), question)
    assert expected in answer.lower(), answer


def test_two_shapes_are_counted_and_told_apart(loaded) -> None:
    shapes = (
        Shape("circle", "orange", cx=0.25, cy=0.5, w=0.3, h=0.3),
        Shape("square", "blue", cx=0.75, cy=0.5, w=0.3, h=0.3),
    )
    image = render(Scene(256, 256, LIGHT, shapes))
    assert "two" in ask(loaded, image, "How many shapes are there?").lower()
    assert "orange" in ask(loaded, image, "What colour is the circle?").lower()
    assert "square" in ask(loaded, image, "What is the blue shape?").lower()


def ask_text(loaded, question: str, **sampling) -> str:
    model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=40, **sampling)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def issue_15_cases() -> list:
    """Every case must pass (the model before round 5 said "four circles" for the three blue circles;
    held-out count is still 70.2%, docs/default_model.md, so a retrained model may miss one again)."""
    return [pytest.param(c, id=f"{c.name}: {c.question}") for c in regression_cases()]


@pytest.mark.parametrize("case", issue_15_cases())
def test_issue_15_cases(loaded, case) -> None:
    """Two blue squares, three blue circles, and a greeting with no picture (issue 15)."""
    if case.image is None:
        answers = [ask_text(loaded, case.question)]
        for seed in range(3):  # and sampled at temperature 0.2, as the report did
            torch.manual_seed(seed)
            answers.append(ask_text(loaded, case.question, do_sample=True, temperature=0.2))
    else:
        answers = [ask(loaded, case.image, case.question)]
    for answer in answers:
        assert score(case.kind, answer, case.target), answer
