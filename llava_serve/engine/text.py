"""Incremental detokenization with stop strings.

Every text handed out is a prefix of the final text: it never shrinks, never ends in half a
multi-byte character, and never shows the start of a stop string that may still complete.
"""

from __future__ import annotations

from typing import Any


class TextAssembler:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # full decoded text so far (stop string cut off once found)
        self.emitted = ""  # what the client has seen
        self._scanned = 0  # stop strings cannot start before this index
        self.stopped = False

    def append(self, token_id: int) -> bool:
        """Add one token; True when a stop string has been found (the text is cut before it)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return False  # an incomplete multi-byte character: wait for the next token
        self.text = text
        return self._find_stop()

    def _find_stop(self) -> bool:
        if not self.stop:
            return False
        start = max(0, self._scanned - self.max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self._scanned = len(self.text)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def visible(self, final: bool = False) -> str:
        """The text safe to show now; with final, everything (a trailing partial character too)."""
        if final and not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        candidate = self.text if final else self.text[: len(self.text) - self._held_back()]
        if candidate.startswith(self.emitted) and len(candidate) >= len(self.emitted):
            self.emitted = candidate
        return self.emitted

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        for k in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
