"""KV of finished requests, kept so that a later prompt starting the same way skips that prefix.

A chat's second turn repeats the first turn (system prompt, image, question, answer) before its
new question: with the first turn's KV kept here, turn 2 prefills only what is new. Entries are
keyed by token ids and by the content keys of their images (image tokens share one id, so the ids
alone would match any two images): a match may cover image tokens only when the entry's images
are the request's first images. Bounded by bytes and by count; least recently used entries go first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PrefixEntry:
    tokens: list[int]
    image_keys: tuple[str, ...]
    kv: LayerKV  # per layer, [kv_heads, len(tokens), head_dim]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


class PrefixCache:
    # lookups compare the prompt with every entry on the engine thread, and a small model's entries
    # are small: bytes alone would let thousands pile up (a soak saw the worker grow with them)
    MAX_ENTRIES = 32

    def __init__(self, max_bytes: int, image_token_id: int | None, max_entries: int = MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.image_token_id = image_token_id
        self.entries: list[PrefixEntry] = []  # most recently used last
        self.hits = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, tokens: Sequence[int], image_keys: Sequence[str]) -> tuple[int, PrefixEntry | None]:
        """The longest reusable prefix (at most len(tokens) - 1: the last token is always run)."""
        best, found = 0, None
        for entry in self.entries:
            n = self._reusable(entry, tokens, image_keys)
            if n > best:
                best, found = n, entry
        if found is not None:
            self.entries.remove(found)
            self.entries.append(found)
            self.hits += 1
            self.reused_tokens += best
        return best, found

    def store(self, tokens: list[int], image_keys: Sequence[str], kv: LayerKV) -> None:
        entry = PrefixEntry(tokens, tuple(image_keys), kv)
        if not self.enabled or entry.nbytes > self.max_bytes or any(k.startswith("anon-") for k in image_keys):
            return
        # an entry this one extends says nothing more
        self.entries = [e for e in self.entries if not _extends(entry, e)]
        self.entries.append(entry)
        while len(self.entries) > self.max_entries or sum(e.nbytes for e in self.entries) > self.max_bytes:
            self.entries.pop(0)

    def _reusable(self, entry: PrefixEntry, tokens: Sequence[int], image_keys: Sequence[str]) -> int:
        n = common_prefix(entry.tokens, tokens)
        n = min(n, len(tokens) - 1)
        if tuple(image_keys[: len(entry.image_keys)]) != entry.image_keys and self.image_token_id is not None:
            n = min(n, _first(tokens, self.image_token_id, n))  # other images: only the text before them
        return n


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _first(tokens: Sequence[int], token: int, limit: int) -> int:
    for i in range(limit):
        if tokens[i] == token:
            return i
    return limit


def _extends(new: PrefixEntry, old: PrefixEntry) -> bool:
    return (
        len(old.tokens) <= len(new.tokens)
        and new.tokens[: len(old.tokens)] == old.tokens
        and new.image_keys[: len(old.image_keys)] == old.image_keys
    )
