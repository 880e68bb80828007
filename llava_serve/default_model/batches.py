"""Training batches: seeded scenes turned into chat conversations, tokenized by the real processor.

The text goes through the same chat template and ``LlavaProcessor`` that serving uses, so what the
model is trained on is exactly what it is asked at inference. Loss is only on assistant answers
(the answer tokens and the closing ``</s>``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import LlavaProcessor

from llava_serve.default_model.build import ModelSize
from llava_serve.default_model.data import Scene, render, sample_scene
from llava_serve.default_model.questions import QA, random_qa
from llava_serve.default_model.vision_aux import centre_labels, patch_labels, region_labels

IGNORE_INDEX = -100
TURN_WEIGHTS = (0.45, 0.3, 0.25)  # conversations of 1, 2 or 3 question/answer turns
# How often each kind of question is asked: telling shapes apart (shape questions) is learnt last.
KIND_WEIGHTS = {"colour": 1.5, "shape": 2.5, "count": 1.5, "position": 1.0, "describe": 1.0}


@dataclass(frozen=True)
class Example:
    scene: Scene
    image: Image.Image
    turns: tuple[QA, ...]


def conversation(turns: tuple[QA, ...] | list[QA], with_answers: bool = True) -> list[dict]:
    """Chat messages; the image goes with the first question, as in LLaVA."""
    messages: list[dict] = []
    for i, qa in enumerate(turns):
        parts = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": qa.question}]
        messages.append({"role": "user", "content": parts})
        if with_answers:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": qa.answer}]})
    return messages


def sample_example(rng: random.Random, weights: dict[str, float] | None = None) -> Example:
    scene = sample_scene(rng)
    n_turns = rng.choices((1, 2, 3), weights=TURN_WEIGHTS)[0]
    qas = tuple(random_qa(scene, rng, weights or KIND_WEIGHTS) for _ in range(n_turns))
    return Example(scene, render(scene, rng), qas)


def examples(seed: int, weights: dict[str, float] | None = None) -> Iterator[Example]:
    """Fresh examples forever; ``weights``: how often each kind of question is asked (KIND_WEIGHTS)."""
    rng = random.Random(seed)
    while True:
        yield sample_example(rng, weights)


def collate(batch: list[Example], processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    """Model inputs with answer-only ``labels``."""
    texts = [processor.apply_chat_template(conversation(ex.turns)) for ex in batch]
    processor.tokenizer.padding_side = "right"  # positions start at 0, as in single-prompt inference
    inputs = processor(text=texts, images=[ex.image for ex in batch], return_tensors="pt", padding=True)
    inputs["labels"] = answer_labels(inputs["input_ids"], inputs["attention_mask"], processor)
    return dict(inputs)


def image_batches(
    seed: int, processor: LlavaProcessor, size: ModelSize, batch_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """(pixel_values, patch, region and centre labels) of fresh scenes, for the vision tower alone."""
    rng = random.Random(seed)
    while True:
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        images = [render(scene, rng) for scene in scenes]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        yield (pixels, *vision_targets(scenes, size))


def vision_targets(scenes: list[Scene], size: ModelSize) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch shape classes, per-patch shape positions and shape-centre flags (see vision_aux)."""
    labels = torch.stack([patch_labels(s, size.image_size, size.patch_size) for s in scenes])
    regions = torch.stack([region_labels(s, patch) for s, patch in zip(scenes, labels, strict=True)])
    centres = torch.stack([centre_labels(s, size.image_size, size.patch_size) for s in scenes])
    return labels, regions, centres


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, processor: LlavaProcessor) -> torch.Tensor:
    """Mark the tokens after each 'ASSISTANT:' up to and including the next '</s>'."""
    tok = processor.tokenizer
    marker = tok(" ASSISTANT:", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(input_ids.tolist()):
        inside = False
        for i, token in enumerate(ids):
            if inside and attention_mask[row, i]:
                labels[row, i] = token
                inside = token != eos
            elif ids[max(0, i - len(marker) + 1) : i + 1] == marker:
                inside = True
    return labels
