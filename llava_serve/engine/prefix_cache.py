"""KV of finished requests, kept so that a later prompt starting the same way skips that prefix.

A chat's second turn repeats the first turn (system prompt, image, question, answer) before its
new question: with the first turn's KV kept here, turn 2 prefills only what is new. Entries are
keyed by token ids and by the content keys of their images (image tokens share one id, so the ids
alone would match any two images): a match may cover image tokens only when the entry's images
are the request's first images. Bounded by bytes and by count; least recently used entries go first.

A client sends the previous answer back as text, and text does not always tokenize back to the ids
the model generated: a model that emits bytes that are not valid UTF-8 streams U+FFFD for them, and
BPE can spell a word with other pieces than the tokenizer would. Token matching then stops at the
first such place and the rest of the answer is read again. So where a match stops inside an entry's
answer, the cache also compares text: if some of the answer's own ids render the same text as the
prompt's ids at that place, the prompt takes the answer's ids there (the model continues from what it
generated, as in a stateful chat), provided the whole rewritten prompt renders the same text as the
prompt it replaces. A cold worker reads the client's ids instead, so the two can differ exactly where
the ids differ; `match_answers=False` keeps strict token matching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
ANSWER_TRIES = 8  # answer lengths tried, from the whole answer down, when matching an answer's text


@dataclass
class PrefixEntry:
    tokens: list[int]
    image_keys: tuple[str, ...]
    kv: LayerKV  # per layer, [kv_heads, len(tokens), head_dim]
    answer_start: int | None = None  # tokens[answer_start:] are ids the model generated

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


class PrefixCache:
    # lookups compare the prompt with every entry on the engine thread, and a small model's entries
    # are small: bytes alone would let thousands pile up (a soak saw the worker grow with them)
    MAX_ENTRIES = 32

    def __init__(
        self,
        max_bytes: int,
        image_token_id: int | None,
        max_entries: int = MAX_ENTRIES,
        decode: Callable[[list[int]], str] | None = None,
        match_answers: bool = True,
    ) -> None:
        self.max_bytes = max_bytes
        self.decode = decode if match_answers else None
        self.max_entries = max_entries
        self.image_token_id = image_token_id
        self.entries: list[PrefixEntry] = []  # most recently used last
        self.hits = 0
        self.reused_tokens = 0
        self.answer_matches = 0  # lookups that took an answer's own ids for the prompt's (see above)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(
        self, tokens: list[int], image_keys: Sequence[str], max_len: int | None = None
    ) -> tuple[int, PrefixEntry | None, list[int]]:
        """The longest reusable prefix (at most len(tokens) - 1: the last token is always run), its
        entry, and the prompt's ids: `tokens` itself unless an entry's answer was matched by text
        (into at most `max_len` ids: the answer's own pieces may be more than the text's)."""
        best, found, ids = 0, None, tokens
        for entry in self.entries:
            n = self._reusable(entry, tokens, image_keys)
            candidate = tokens
            if (
                self.decode is not None
                and entry.answer_start is not None
                and entry.answer_start <= n < len(entry.tokens)
            ):
                rewritten = self._same_answer(entry, tokens, n, len(tokens) if max_len is None else max_len)
                if rewritten is not None:
                    candidate = rewritten
                    n = min(common_prefix(entry.tokens, rewritten), len(rewritten) - 1)
            if n > best:
                best, found, ids = n, entry, candidate
        if found is not None:
            self.entries.remove(found)
            self.entries.append(found)
            self.hits += 1
            self.reused_tokens += best
            self.answer_matches += ids is not tokens
        return best, found, ids

    def _same_answer(self, entry: PrefixEntry, tokens: list[int], n: int, max_len: int) -> list[int] | None:
        """`tokens` with entry.tokens[n:n + q] in place of tokens[n:n + j], for the longest q whose
        text equals that of some j of the prompt's ids, if the result renders the same text as
        `tokens`; None if there is none. Both sides are decoded behind the last shared id (n >= 1),
        so a tokenizer's start-of-text quirks apply to neither."""
        assert self.decode is not None
        mine, theirs = entry.tokens[n:], tokens[n:]
        if n < 1 or (self.image_token_id is not None and self.image_token_id in mine):
            return None
        anchor = [tokens[n - 1]]
        rest = self.decode(anchor + theirs)
        whole: str | None = None  # the prompt's text, decoded once when a rewrite is first checked
        for q in range(len(mine), max(0, len(mine) - ANSWER_TRIES), -1):
            text = self.decode(anchor + mine[:q])
            if not rest.startswith(text):
                continue
            for j in self._cuts(anchor, theirs, text):
                if self.image_token_id is not None and self.image_token_id in theirs[:j]:
                    continue
                rewritten = tokens[:n] + mine[:q] + theirs[j:]
                if len(rewritten) > max_len:
                    continue
                whole = self.decode(tokens) if whole is None else whole
                if self.decode(rewritten) == whole:
                    return rewritten
        return None

    def _cuts(self, anchor: list[int], ids: list[int], text: str) -> list[int]:
        """The j with decode(anchor + ids[:j]) == text, near the first j whose text is at least as
        long (bisected: the text grows with j, but for replacement characters, which can also end
        a cut in the middle of a character's bytes; the caller checks each cut)."""
        assert self.decode is not None
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(anchor + ids[:mid])) < len(text):
                lo = mid + 1
            else:
                hi = mid
        window = range(max(0, lo - 2), min(len(ids), lo + 4) + 1)
        return [j for j in window if self.decode(anchor + ids[:j]) == text]

    def store(self, tokens: list[int], image_keys: Sequence[str], kv: LayerKV, answer_start: int | None = None) -> None:
        entry = PrefixEntry(tokens, tuple(image_keys), kv, answer_start)
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
