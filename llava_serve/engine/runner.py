"""ModelRunner: the only code that calls the model. Prefill one request, decode the batch."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache

from llava_serve.engine.kv import SlotCache
from llava_serve.engine.request import Request
from llava_serve.models.base import LoadedModel, PreparedImage


class FeatureCache:
    """Bounded LRU of image features by content key: a repeated image skips the vision tower."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class ModelRunner:
    def __init__(self, lm: LoadedModel, max_rows: int, feature_cache_size: int = 64) -> None:
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        self.features = FeatureCache(feature_cache_size)
        num_layers = lm.model.config.get_text_config(decoder=True).num_hidden_layers
        self.kv = SlotCache(num_layers, max_rows)
        self.rows: list[Request] = []

    @torch.inference_mode()
    def encode_images(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Features for every image unit of these requests, the missing ones in one vision batch."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, PreparedImage] = {}
        for req in requests:
            for unit in req.prompt.images:
                cached = self.features.get(unit.key) if unit.key not in found else found[unit.key]
                if cached is not None:
                    found[unit.key] = cached
                else:
                    missing.setdefault(unit.key, unit)
        units = list(missing.values())
        for unit, feats in zip(units, self.lm.image_features(units)):
            found[unit.key] = feats
            self.features.put(unit.key, feats)
        return found

    @torch.inference_mode()
    def prefill(self, req: Request, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the prompt, add the request as a KV row; returns the last position's logits."""
        ids = torch.tensor([req.prompt.input_ids], device=self.device)
        embeds = self.lm.embed(ids, [features[u.key] for u in req.prompt.images])
        cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
        self.kv.add_row(cache, req.prompt_len)
        self.rows.append(req)
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One token for every row; returns logits [rows, vocab] in row order."""
        last = [req.output_ids[-1] for req in self.rows]
        positions = [req.prompt_len + len(req.output_ids) - 1 for req in self.rows]
        ids = torch.tensor(last, device=self.device).unsqueeze(1)
        pos = torch.tensor(positions, device=self.device).unsqueeze(1)
        mask = self.kv.begin_step()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=self.kv,
            use_cache=True,
            logits_to_keep=1,
        )
        self.kv.end_step()
        return out.logits[:, -1]

    def release(self, req: Request) -> None:
        row = self.rows.index(req)
        moved = self.kv.remove_row(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
        self.rows.pop()

    def release_all(self) -> None:
        for req in list(self.rows):
            self.release(req)
