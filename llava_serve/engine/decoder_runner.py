"""DecoderRunner: the fast path for Llama, Mistral and Qwen2 decoders (see decoder.py).

Vision tower and projector stay on transformers (`RunnerBase.begin_prefill` builds the prompt's
embeddings with them); the decoder runs from fused weights over a slot KV cache, decode rows and
a prompt chunk in one forward. Finished requests leave their KV in a prefix cache, so a chat's
next turn reads only its new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from llava_serve.engine.decoder import DecoderForward, PromptChunk
from llava_serve.engine.decoder_weights import DecoderWeights
from llava_serve.engine.prefix_cache import PrefixCache
from llava_serve.engine.request import Request
from llava_serve.engine.runner import RunnerBase
from llava_serve.engine.scheduler import Batch
from llava_serve.engine.slots import KVSlots
from llava_serve.models.base import LoadedModel


class DecoderRunner(RunnerBase):
    name = "decoder"
    chunked = True

    def __init__(
        self,
        lm: LoadedModel,
        weights: DecoderWeights,
        max_rows: int,
        feature_cache_size: int = 64,
        prefix_cache_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(lm, feature_cache_size)
        self.kv = KVSlots(weights.num_layers, weights.kv_heads, weights.head_dim, max_rows, lm.context_length)
        self.kv.configure(weights.embed.dtype, weights.embed.device)
        self.forward = DecoderForward(weights, self.kv, lm.context_length)
        decode = getattr(lm.tokenizer, "decode", None)
        self.prefixes = PrefixCache(
            prefix_cache_bytes,
            lm.image_token_id,
            decode=(lambda ids: decode(ids, skip_special_tokens=False)) if decode is not None else None,
        )

    def begin_prefill(self, req: Request, row: int, upcoming: Sequence[Request] = ()) -> None:
        length, entry = 0, None
        if self.prefixes.enabled:  # first: a match may give the prompt an earlier answer's own ids
            keys = [u.key for u in req.prompt.images]
            room = self.lm.context_length - req.max_tokens  # the prompt may grow into what generation leaves
            length, entry, ids = self.prefixes.lookup(req.prompt.input_ids, keys, max(room, req.prompt_len))
            if ids is not req.prompt.input_ids:
                req.prompt = replace(req.prompt, input_ids=ids)
        super().begin_prefill(req, row, upcoming)
        if entry is not None and length > 0:
            self.kv.write_row(row, entry.kv, length)
            req.num_computed = length

    def run(self, batch: Batch) -> torch.Tensor:
        rows = batch.decode
        tokens = [req.output_ids[-1] for req in rows]
        positions = [req.kv_len for req in rows]
        end = max(positions, default=-1) + 1
        chunks, reading = [], []
        for i, (req, size) in enumerate(zip(batch.prefill, batch.chunks, strict=True)):
            assert req.prompt_embeds is not None
            if size <= 0:  # only its images this step (the scheduler's cost rule)
                continue
            start = req.num_computed
            stop = min(req.prompt_len, start + size)
            chunks.append(PromptChunk(req.prompt_embeds[start:stop], start, stop == req.prompt_len, len(rows) + i))
            reading.append(req)
            end = max(end, stop)
        self.kv.ensure(len(rows) + len(batch.prefill), end)
        logits = self.forward(tokens, positions, chunks)
        for req, chunk in zip(reading, chunks, strict=True):
            req.num_computed = chunk.start + chunk.embeds.shape[0]
            if req.prefilled:
                req.prompt_embeds = None
        return logits

    def retain(self, req: Request, row: int) -> None:
        length = req.kv_len
        if not self.prefixes.enabled or length <= 0 or row >= self.kv.rows:
            return
        tokens = (req.prompt.input_ids + req.output_ids)[:length]
        keys = [u.key for u in req.prompt.images]
        self.prefixes.store(tokens, keys, self.kv.read_row(row, length), answer_start=req.prompt_len)

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.kv.move_row(src, dst, length)

    def use_rows(self, rows: int) -> None:
        if rows == 0:
            self.kv.free()
