"""What transformers itself does with a chat: processor.apply_chat_template (tokenized), forward, generate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from llava_serve.models.base import LoadedModel

NEW_TOKENS = 32
# the issue's four shapes (width x height), scaled down 10x to keep the tiny models' prompts short
SHAPES = [(80, 30), (30, 90), (64, 48), (5, 12)]


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@dataclass
class Chat:
    """Messages in the OpenAI-like shape the project takes; images in the order they appear."""

    messages: list[dict]
    images: list[Image.Image]

    def for_transformers(self) -> list[dict]:
        pics = iter(self.images)
        return [
            {
                **m,
                "content": [
                    {"type": "image", "image": next(pics)} if c["type"] == "image" else c for c in m["content"]
                ],
            }
            for m in self.messages
        ]


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def chat(feature: str, seed: int = 0) -> Chat:
    if feature == "one-image":
        return Chat([user("What is in this picture?", 1)], [picture(SHAPES[0], seed)])
    if feature == "multi-image":
        return Chat([user("Compare the two pictures.", 2)], [picture(SHAPES[0], seed), picture(SHAPES[1], seed + 1)])
    if feature == "no-image":
        return Chat([user("Tell me about the colour red.")], [])
    assert feature == "multi-turn"
    turns = [user("What is this?", 1), {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
    return Chat([*turns, user("And what colour is the background?")], [picture(SHAPES[2], seed)])


def processor_inputs(lm: LoadedModel, c: Chat) -> dict:
    inputs = lm.processor.apply_chat_template(
        c.for_transformers(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return dict(inputs)


@torch.inference_mode()
def prefill_logits(lm: LoadedModel, inputs: dict) -> torch.Tensor:
    return lm.model(**inputs).logits[0, -1].float()


@torch.inference_mode()
def generate(lm: LoadedModel, inputs: dict) -> list[int]:
    out = lm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@torch.inference_mode()
def serving_prefill_logits(lm: LoadedModel, prompt: str, images: list[Image.Image]) -> torch.Tensor:
    """The serving path's prefill: encode, vision tower per prepared unit, features over image tokens."""
    encoded = lm.encode(prompt, images)
    ids = torch.tensor([encoded.input_ids])
    embeds = lm.embed(ids, lm.image_features(encoded.images))
    return lm.model(inputs_embeds=embeds).logits[0, -1].float()
