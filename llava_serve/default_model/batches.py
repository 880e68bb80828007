"""Training batches: seeded scenes turned into chat conversations, tokenized by the real processor.

The text goes through the same chat template and ``LlavaProcessor`` that serving uses, so what the
model is trained on is exactly what it is asked at inference. Loss is only on assistant answers
(the answer tokens and the closing ``</s>``).
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from PIL import Image
from transformers import LlavaProcessor

from llava_serve.default_model.build import ModelSize
from llava_serve.default_model.data import SAME_SHARE, Scene, render, sample_scene
from llava_serve.default_model.questions import QA, random_qa, text_only_qa
from llava_serve.default_model.vision_aux import (
    centre_labels,
    count_targets,
    density_targets,
    patch_labels,
    region_labels,
)

IGNORE_INDEX = -100
# Conversations of 1-4 question/answer turns: later turns reuse the prompt and the picture's 36 tokens,
# so more answers are learnt per token computed (the system prompt and the picture are ~2/3 of a
# one-turn conversation).
TURN_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
# How often each kind of question is asked: telling shapes apart (shape questions) is learnt last.
# Position is asked most: naming a place needs the decoder to find the shape's patches and read
# where they are, which the first recipe (position asked as often as describe) never learnt.
KIND_WEIGHTS = {"colour": 1.5, "shape": 2.0, "count": 2.0, "position": 3.0, "describe": 1.0}
TEXT_ONLY = 0.05  # of the conversations have no picture (greetings and the like)


@dataclass(frozen=True)
class Example:
    scene: Scene | None  # None: a text-only conversation
    image: Image.Image | None
    turns: tuple[QA, ...]


def conversation(turns: tuple[QA, ...] | list[QA], with_answers: bool = True, with_image: bool = True) -> list[dict]:
    """Chat messages; the image (if any) goes with the first question, as in LLaVA."""
    messages: list[dict] = []
    for i, qa in enumerate(turns):
        parts = ([{"type": "image"}] if i == 0 and with_image else []) + [{"type": "text", "text": qa.question}]
        messages.append({"role": "user", "content": parts})
        if with_answers:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": qa.answer}]})
    return messages


def sample_example(
    rng: random.Random,
    weights: dict[str, float] | None = None,
    text_only: float = TEXT_ONLY,
    varied: float = 0.0,
    same_share: float = SAME_SHARE,
) -> Example:
    """``text_only``: the share of conversations with no picture; ``varied``: the chance that each of their
    questions is reworded (questions.text_only_qa); ``same_share``: of the pictures of two or more shapes,
    the share with every shape one kind and colour (data.sample_scene)."""
    if rng.random() < text_only:
        return Example(None, None, tuple(text_only_qa(rng, varied) for _ in range(rng.choice((1, 1, 2)))))
    scene = sample_scene(rng, same_share=same_share)
    n_turns = rng.choices(range(1, len(TURN_WEIGHTS) + 1), weights=TURN_WEIGHTS)[0]
    qas = tuple(random_qa(scene, rng, weights or KIND_WEIGHTS) for _ in range(n_turns))
    return Example(scene, render(scene, rng), qas)


def examples(
    seed: int,
    weights: dict[str, float] | None = None,
    text_only: float = TEXT_ONLY,
    varied: float = 0.0,
    same_share: float = SAME_SHARE,
) -> Iterator[Example]:
    """Fresh examples forever; ``weights``: how often each kind of question is asked (KIND_WEIGHTS);
    ``text_only``, ``varied`` and ``same_share``: see sample_example."""
    rng = random.Random(seed)
    while True:
        yield sample_example(rng, weights, text_only, varied, same_share)


def by_length(stream: Iterator[Example], batch_size: int, seed: int, pool: int = 8) -> Iterator[list[Example]]:
    """Batches of ``batch_size`` from ``stream``, cut from ``pool`` batches' worth sorted by length and
    then shuffled, so that a batch pads little (a quarter fewer tokens than batches in stream order)."""
    rng = random.Random(seed)
    while True:
        chunk = sorted(islice(stream, batch_size * pool), key=_length)
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def _length(example: Example) -> int:
    """About the conversation's length in tokens (its text's characters, and the picture)."""
    text = sum(len(qa.question) + len(qa.answer) for qa in example.turns) // 4
    return text + (0 if example.image is None else 1000)


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` made in a background thread, ``depth`` ahead (drawing overlaps the training step)."""
    ready: queue.Queue = queue.Queue(depth)

    def produce() -> None:
        for item in items:
            ready.put(item)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        yield ready.get()


def pixel_values(images: list[Image.Image], processor: LlavaProcessor) -> torch.Tensor:
    """What ``processor.image_processor`` makes of ``images`` (pad to a square with the mean colour,
    bicubic resize, CLIP normalisation), several times faster; a test checks they agree."""
    ip = processor.image_processor
    side_out = ip.size["height"]
    mean, std = np.array(ip.image_mean, dtype=np.float32), np.array(ip.image_std, dtype=np.float32)
    pad = tuple(int(x * 255) for x in ip.image_mean)
    out = np.empty((len(images), 3, side_out, side_out), dtype=np.float32)
    for i, image in enumerate(images):
        w, h = image.size
        side = max(w, h)
        if w != h:
            square = Image.new("RGB", (side, side), pad)
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            image = square
        pixels = np.asarray(image.resize((side_out, side_out), Image.BICUBIC), dtype=np.float32) / 255.0
        out[i] = ((pixels - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(out)


def collate(batch: list[Example], processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    """Model inputs with answer-only ``labels`` (what ``processor(text, images)`` returns, made faster)."""
    texts = [processor.apply_chat_template(conversation(ex.turns, with_image=ex.image is not None)) for ex in batch]
    processor.tokenizer.padding_side = "right"  # positions start at 0, as in single-prompt inference
    images = [ex.image for ex in batch if ex.image is not None]
    image_token = processor.tokenizer.image_token
    expanded = [t.replace(image_token, image_token * image_seq_length(processor)) for t in texts]
    inputs = dict(processor.tokenizer(expanded, return_tensors="pt", padding=True))
    if images:
        inputs["pixel_values"] = pixel_values(images, processor)
    inputs["labels"] = answer_labels(inputs["input_ids"], inputs["attention_mask"], processor)
    return inputs


def image_seq_length(processor: LlavaProcessor) -> int:
    """Image tokens per picture: one per patch (CLIP's CLS is dropped)."""
    return (processor.image_processor.size["height"] // processor.patch_size) ** 2


def image_batches(
    seed: int, processor: LlavaProcessor, size: ModelSize, batch_size: int, easy_batches: int = 0
) -> Iterator[tuple[torch.Tensor, ...]]:
    """(pixel_values, patch, region and centre labels, counts, densities) of fresh scenes, for the tower alone.

    A curriculum over the first ``easy_batches`` batches: a picture is drawn plain (``render`` without a
    style: the reference colours, solid, on a light background) with a chance falling from 1 to 0
    over them, else in the varied styles training draws from then on."""
    rng = random.Random(seed)
    produced = 0
    while True:
        easy = max(0.0, 1.0 - produced / easy_batches) if easy_batches else 0.0
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        images = [render(scene, None if rng.random() < easy else rng) for scene in scenes]
        pixels = pixel_values(images, processor)
        produced += 1
        yield (pixels, *vision_targets(scenes, size))


def vision_targets(scenes: list[Scene], size: ModelSize) -> tuple[torch.Tensor, ...]:
    """Per-patch shape classes, per-patch shape positions, shape-centre flags, per-picture counts and
    per-patch count densities (see vision_aux)."""
    labels = torch.stack([patch_labels(s, size.image_size, size.patch_size) for s in scenes])
    regions = torch.stack([region_labels(s, patch) for s, patch in zip(scenes, labels, strict=True)])
    centres = torch.stack([centre_labels(s, size.image_size, size.patch_size) for s in scenes])
    counts = torch.stack([count_targets(s) for s in scenes])
    densities = torch.stack([density_targets(s, size.image_size, size.patch_size) for s in scenes])
    return labels, regions, centres, counts, densities


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
