"""Scheduler: who runs in the next step, in which KV row, and how much of a prompt it prefills.

It is the one owner of the requests' places: `waiting` (a FIFO), `running` (decoding; list index =
KV row) and `prefilling` (at most one request, whose prompt is being read, in row len(running)).
A step decodes every running row and reads a chunk of the prefilling prompt in the same forward
(chunked prefill): with decode rows running, the chunk is sized so the step handles about
`step_tokens` tokens, so running streams keep their pace while a long image prompt is read; with
none running the whole prompt goes at once. `step_tokens=None` never chunks (the transformers path).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from llava_serve.engine.request import Request, Status

MIN_CHUNK = 8  # a prompt always advances by at least this many tokens per step


class RowStore(Protocol):
    """The KV storage the rows live in (the runner's cache)."""

    def move_row(self, src: int, dst: int, length: int) -> None: ...

    def use_rows(self, rows: int) -> None: ...


@dataclass
class Batch:
    decode: list[Request]  # rows 0..len-1, one token each
    prefill: Request | None = None  # row len(decode)
    chunk: int = 0  # at most this many of its prompt tokens in this step


class Scheduler:
    def __init__(self, max_running: int, rows: RowStore, step_tokens: int | None = None) -> None:
        self.max_running = max_running
        self.rows = rows
        self.step_tokens = step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: Request | None = None

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule(self) -> Batch:
        if self.prefilling is None and self.waiting and len(self.running) < self.max_running:
            self.prefilling = self.waiting.popleft()
            self.prefilling.status = Status.RUNNING
        batch = Batch(decode=list(self.running), prefill=self.prefilling)
        if batch.prefill is not None:
            batch.chunk = self._chunk(batch.prefill)
        return batch

    def _chunk(self, req: Request) -> int:
        left = req.prompt_len - req.num_computed
        if self.step_tokens is None or not self.running:
            return left
        return min(left, max(MIN_CHUNK, self.step_tokens - len(self.running)))

    def promote(self, req: Request) -> None:
        """Its prompt is read: it decodes from the next step, in the row it was prefilled in."""
        assert req is self.prefilling
        self.running.append(req)
        self.prefilling = None

    def finish(self, req: Request) -> None:
        """Take a request out; the last running row moves into its row (rows stay dense)."""
        req.status = Status.FINISHED
        if req is self.prefilling:
            self.prefilling = None
        elif req in self.waiting:
            self.waiting.remove(req)
            return
        elif req in self.running:
            self._remove_running(req)
        self.rows.use_rows(len(self.running) + (self.prefilling is not None))

    def _remove_running(self, req: Request) -> None:
        row, last = self.running.index(req), len(self.running) - 1
        if row != last:
            moved = self.running[last]
            # an upper bound: mid-postprocess its KV may hold one more position than kv_len says
            self.rows.move_row(last, row, moved.prompt_len + len(moved.output_ids))
            self.running[row] = moved
        self.running.pop()
        if self.prefilling is not None:  # the prefill row follows the running rows
            self.rows.move_row(last + 1, last, self.prefilling.num_computed)

    def cancelled(self) -> list[Request]:
        pending = [self.prefilling] if self.prefilling is not None else []
        return [r for r in (*self.running, *pending, *self.waiting) if r.cancelled]

    def all_requests(self) -> list[Request]:
        pending = [self.prefilling] if self.prefilling is not None else []
        return [*self.running, *pending, *self.waiting]
