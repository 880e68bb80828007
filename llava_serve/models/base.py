"""The one object every loader returns and the engine consumes.

A `LoadedModel` knows how to turn a LLaVA-protocol prompt (`<image>` placeholders) plus images
into token ids and pixel tensors (`encode`), how to run the vision side in batches
(`image_features`), how to merge features into the token embeddings (`embed`), and how to build
a prompt from chat messages (`build_prompt`). The engine never looks at the model family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from llava_serve.errors import ContextOverflow, ImageCountMismatch, InvalidRequest

IMAGE_PLACEHOLDER = "<image>"

# messages: [{"role": str, "content": str | [{"type": "text", "text": str} | {"type": "image"}]}]
Message = dict[str, Any]
PromptBuilder = Callable[[Sequence[Message], bool], str]
# (prompt with placeholders, images) -> (input ids with image tokens expanded, prepared images)
Encoder = Callable[[str, Sequence[Image.Image], Sequence[str]], "EncodedPrompt"]


@dataclass
class PreparedImage:
    """One unit for the vision tower: usually one image, its tensors and a content key."""

    key: str
    inputs: dict[str, torch.Tensor]
    num_images: int = 1


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    images: list[PreparedImage] = field(default_factory=list)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    context_length: int
    is_multimodal: bool
    encoder: Encoder
    prompt_builder: PromptBuilder
    processor: Any = None
    image_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # families whose get_image_features returns one feature tensor per image, in order
    batchable_vision: bool = False
    template_name: str = "hf"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        emb = self.model.get_input_embeddings()
        return emb.weight.dtype if emb.weight.dtype.is_floating_point else torch.float32

    def encode(self, prompt: str, images: Sequence[Image.Image], keys: Sequence[str] = ()) -> EncodedPrompt:
        """Validate the image count and the context length, then tokenize."""
        n_tags = prompt.count(IMAGE_PLACEHOLDER)
        if n_tags != len(images):
            raise ImageCountMismatch(
                f"the prompt has {n_tags} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) were "
                f"sent; send exactly one image per {IMAGE_PLACEHOLDER}"
            )
        if images and not self.is_multimodal:
            raise InvalidRequest(f"model {self.name} is text-only and cannot take images")
        keys = list(keys) or [f"anon-{id(img)}" for img in images]
        encoded = self.encoder(prompt, images, keys)
        if len(encoded.input_ids) >= self.context_length:
            raise ContextOverflow(
                f"the prompt is {len(encoded.input_ids)} tokens (images included) but the context length "
                f"is {self.context_length}; shorten the prompt or send fewer images"
            )
        return encoded

    def build_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self.prompt_builder(messages, add_generation_prompt)

    @torch.inference_mode()
    def image_features(self, units: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """Run the vision tower + projector: one [tokens, hidden] tensor per unit."""
        if not units:
            return []
        if self.batchable_vision and len(units) > 1:
            groups: dict[tuple, list[int]] = {}
            for i, unit in enumerate(units):
                sig = tuple((k, tuple(v.shape[1:])) for k, v in sorted(unit.inputs.items()))
                groups.setdefault(sig, []).append(i)
            out: list[torch.Tensor | None] = [None] * len(units)
            for idxs in groups.values():
                merged = {k: torch.cat([units[i].inputs[k] for i in idxs]) for k in units[idxs[0]].inputs}
                per_image = self._vision(merged)
                offset = 0
                for i in idxs:
                    n = units[i].num_images
                    out[i] = torch.cat(per_image[offset : offset + n])
                    offset += n
            return [t for t in out if t is not None]
        return [torch.cat(self._vision(unit.inputs)) for unit in units]

    def _vision(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        device, dtype = self.device, self.dtype
        moved = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        result = self.model.get_image_features(**moved)
        pooled = result.pooler_output if hasattr(result, "pooler_output") else result
        if isinstance(pooled, torch.Tensor):
            pooled = [pooled.reshape(-1, pooled.shape[-1])] if pooled.dim() > 2 else [pooled]
        return [p.reshape(-1, p.shape[-1]) for p in pooled]

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the image features written over the image-token positions."""
        embeddings = self.model.get_input_embeddings()
        if not features:
            return embeddings(input_ids)
        mask = input_ids == self.image_token_id
        safe_ids = input_ids.masked_fill(mask, 0)
        embeds = embeddings(safe_ids)
        feats = torch.cat(list(features)).to(embeds.device, embeds.dtype)
        if int(mask.sum()) != feats.shape[0]:
            raise InvalidRequest(
                f"image features ({feats.shape[0]}) do not match image tokens ({int(mask.sum())}) in the prompt"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), feats)
