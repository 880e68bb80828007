"""Greedy decoding two ways: the serving path (encode -> image_features -> embed -> forward with a
DynamicCache) and plain transformers `model.generate`. Both stop at the model's EOS tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import DynamicCache

from llava_serve.models.base import LoadedModel


@torch.inference_mode()
def serving_greedy(lm: LoadedModel, prompt: str, images: Sequence[Image.Image], max_new_tokens: int) -> list[int]:
    encoded = lm.encode(prompt, images)
    ids = torch.tensor([encoded.input_ids], device=lm.device)
    embeds = lm.embed(ids, lm.image_features(encoded.images))
    cache = DynamicCache(config=lm.model.config)
    logits = lm.model(inputs_embeds=embeds, cache=cache, use_cache=True).logits[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token in lm.eos_token_ids:
            break
        step = lm.embed(torch.tensor([[token]], device=lm.device), [])
        logits = lm.model(inputs_embeds=step, cache=cache, use_cache=True).logits[0, -1]
    return out


def pixel_inputs(lm: LoadedModel, prompt: str, images: Sequence[Image.Image]) -> tuple[torch.Tensor, dict]:
    encoded = lm.encode(prompt, images)
    units = encoded.images
    pixels = {k: torch.cat([u.inputs[k] for u in units]) for k in (units[0].inputs if units else {})}
    return torch.tensor([encoded.input_ids]), pixels


@torch.inference_mode()
def generate_greedy(lm: LoadedModel, prompt: str, images: Sequence[Image.Image], max_new_tokens: int) -> list[int]:
    ids, pixels = pixel_inputs(lm, prompt, images)
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **pixels,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=lm.eos_token_ids,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()
