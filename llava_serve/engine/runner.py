"""Runners: the only code that calls the model. `HFRunner` is the transformers path.

A runner turns a scheduled `Batch` into logits: one row per decode row (in row order), plus one
for each prefilling request whose prompt this step finished. It also owns the vision side
(a content-keyed feature cache, newcomers' images in one vision batch) and the KV storage the
scheduler moves rows in. `DecoderRunner` (decoder_runner.py) is the fast path for Llama, Mistral
and Qwen2 decoders; `HFRunner` runs any model transformers loads, whole prompts only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache

from llava_serve.engine.kv import SlotCache
from llava_serve.engine.request import Request
from llava_serve.engine.scheduler import Batch
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


class RunnerBase:
    """What both runners share: images, prompt embeddings. Subclasses run batches and hold the KV."""

    name = "base"
    chunked = False  # can read a prompt in chunks alongside decode rows

    def __init__(self, lm: LoadedModel, feature_cache_size: int = 64) -> None:
        self.lm = lm
        self.device = lm.device
        self.features = FeatureCache(feature_cache_size)

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
    def begin_prefill(self, req: Request, row: int, upcoming: Sequence[Request] = ()) -> None:
        """The prompt's embeddings (images merged in); `upcoming` requests' images join the vision batch."""
        features = self.encode_images([req, *upcoming])
        ids = torch.tensor([req.prompt.input_ids], device=self.device)
        req.prompt_embeds = self.lm.embed(ids, [features[u.key] for u in req.prompt.images])[0]

    def retain(self, req: Request, row: int) -> None:
        """A request leaves from `row`; a runner with a prefix cache keeps its KV."""

    def run(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def move_row(self, src: int, dst: int, length: int) -> None:
        raise NotImplementedError

    def use_rows(self, rows: int) -> None:
        raise NotImplementedError


class HFRunner(RunnerBase):
    """Through transformers' own forward: rows left-padded in a `SlotCache`, prompts read whole."""

    name = "transformers"

    def __init__(self, lm: LoadedModel, max_rows: int, feature_cache_size: int = 64) -> None:
        super().__init__(lm, feature_cache_size)
        self.model = lm.model
        num_layers = lm.model.config.get_text_config(decoder=True).num_hidden_layers
        self.kv = SlotCache(num_layers, max_rows)

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        logits = []
        if batch.decode:
            logits.append(self.decode(batch.decode))
        for req in batch.prefill:  # one whole prompt (the scheduler reads this runner's prompts unchunked)
            logits.append(self.prefill(req).unsqueeze(0))
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def prefill(self, req: Request) -> torch.Tensor:
        """Run the whole prompt, add the request as the last KV row; returns its last logits."""
        assert req.prompt_embeds is not None
        cache = DynamicCache(config=self.model.config)
        embeds = req.prompt_embeds.unsqueeze(0)
        out = self.model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
        self.kv.add_row(cache, req.prompt_len)
        req.num_computed, req.prompt_embeds = req.prompt_len, None
        return out.logits[0, -1]

    def decode(self, rows: list[Request]) -> torch.Tensor:
        """One token for every row; returns logits [rows, vocab] in row order."""
        ids = torch.tensor([req.output_ids[-1] for req in rows], device=self.device).unsqueeze(1)
        pos = torch.tensor([req.kv_len for req in rows], device=self.device).unsqueeze(1)
        mask = self.kv.begin_step()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, cache=self.kv, use_cache=True, logits_to_keep=1
        )
        self.kv.end_step()
        return out.logits[:, -1]

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.kv.move_row(src, dst)

    def use_rows(self, rows: int) -> None:
        self.kv.use_rows(rows)
