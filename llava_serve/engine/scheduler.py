"""Scheduler: who runs in the next step, in which KV row, and how much of each prompt it prefills.

It is the one owner of the requests' places: `waiting` (a FIFO), `running` (decoding; list index =
KV row) and `prefilling` (requests whose prompts are being read, in rows len(running) onwards, in
arrival order). A step decodes every running row and reads chunks of the prefilling prompts in the
same forward (chunked prefill, several prompts a step: split-fuse).

How many prompt tokens a step reads trades the running streams' inter-token latency against the
newcomers' time to first token and the step's efficiency (a CPU matmul runs at ~70% of its peak
with 16 rows, ~95% with 256). The budget is `step_tokens` tokens per request waiting for its first
token, up to `max_step_tokens` a step, less the decode rows: one newcomer beside running streams
is read in small chunks, so they keep their pace (the chunked-prefill ITL target); a crowd of
newcomers (a burst of clients) is read in large steps, as vLLM's and OpenVINO's token budgets do,
so they all start sooner and decode together instead of trickling in one small chunk at a time.
With fewer newcomers than running streams and the step costs known (`StepCosts`, timed by the
engine), a step reads only the prompt tokens that add at most `slack` of a decode step per newcomer,
so beside one newcomer the streams' inter-token latency stays within (1 + slack) of its idle value
whatever the model's speed.
With nothing decoding, a step reads at least the whole first prompt. `step_tokens=None` never
chunks and reads one whole prompt a step (the transformers path).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from llava_serve.engine.request import Request, Status
from llava_serve.engine.step_costs import StepCosts

MIN_CHUNK = 8  # a prompt always advances by at least this many tokens per step
IMAGES_ONLY = -1  # _budget's answer when the step's allowance goes to a newcomer's images alone


class RowStore(Protocol):
    """The KV storage the rows live in (the runner's cache)."""

    def move_row(self, src: int, dst: int, length: int) -> None: ...

    def use_rows(self, rows: int) -> None: ...


@dataclass
class Batch:
    decode: list[Request]  # rows 0..len-1, one token each
    prefill: list[Request] = field(default_factory=list)  # rows len(decode).., in order
    chunks: list[int] = field(default_factory=list)  # prompt tokens of each prefill read this step

    @property
    def prompt_tokens(self) -> int:
        return sum(self.chunks)

    def drop(self, req: Request) -> None:
        """A prefill that failed before running leaves the batch (the scheduler moved the rows after it)."""
        i = self.prefill.index(req)
        del self.prefill[i], self.chunks[i]


class Scheduler:
    def __init__(
        self,
        max_running: int,
        rows: RowStore,
        step_tokens: int | None = None,
        max_step_tokens: int | None = None,
        costs: StepCosts | None = None,
    ) -> None:
        self.max_running = max_running
        self.costs = costs
        self.rows = rows
        self.step_tokens = step_tokens
        self.max_step_tokens = max(step_tokens or 0, max_step_tokens or 0)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule(self) -> Batch:
        batch = Batch(decode=list(self.running))
        if self.step_tokens is None:  # whole prompts, one a step
            if not self.prefilling and self.waiting and len(self.running) < self.max_running:
                self._admit()
            if self.prefilling:
                req = self.prefilling[0]
                batch.prefill, batch.chunks = [req], [req.prompt_len - req.num_computed]
            return batch
        budget = self._budget()
        if budget == IMAGES_ONLY:  # the next newcomer starts, reading no tokens yet
            if not self.prefilling:
                self._admit()
            batch.prefill, batch.chunks = [self.prefilling[0]], [0]
            return batch
        i = 0
        while budget > 0:
            if i == len(self.prefilling):
                if not self.waiting or len(self.running) + len(self.prefilling) >= self.max_running:
                    break
                if batch.prefill and budget < MIN_CHUNK:
                    break
                self._admit()
            req = self.prefilling[i]
            take = min(req.prompt_len - req.num_computed, budget)
            batch.prefill.append(req)
            batch.chunks.append(take)
            budget -= take
            i += 1
        return batch

    def _budget(self) -> int:
        """Prompt tokens this step reads, or IMAGES_ONLY."""
        assert self.step_tokens is not None
        free = self.max_running - len(self.running)
        pending = min(free, len(self.prefilling) + len(self.waiting))
        if pending == 0:
            return 0
        budget = min(self.max_step_tokens, self.step_tokens * pending)
        first = self.prefilling[0] if self.prefilling else self.waiting[0]
        if not self.running:  # nothing to keep pace with: at least the whole first prompt
            return max(budget, first.prompt_len - first.num_computed)
        budget = max(MIN_CHUNK, budget - len(self.running))
        if self.costs is not None and pending < len(self.running):
            newcomer = int(first.prompt_embeds is None and not first.num_computed)  # its images run this step
            fits = self.costs.chunk_tokens(len(self.running), newcomer)
            if fits is not None and newcomer and fits < MIN_CHUNK:
                return IMAGES_ONLY  # its images alone take the allowance
            if fits is not None:  # like the token budget, an allowance per request waiting to start
                more = (pending - 1) * (self.costs.chunk_tokens(len(self.running)) or 0)
                budget = min(budget, max(MIN_CHUNK, fits + more))
        return budget

    def _admit(self) -> None:
        req = self.waiting.popleft()
        req.status = Status.RUNNING
        self.prefilling.append(req)

    def promote(self, req: Request) -> None:
        """Its prompt is read: it decodes from the next step, in the row it was prefilled in (the
        first prefilling row: prompts are read in arrival order, so they finish in it)."""
        assert self.prefilling and req is self.prefilling[0]
        self.running.append(self.prefilling.pop(0))

    def finish(self, req: Request) -> None:
        """Take a request out; the last running row moves into its row and the prefilling rows
        close up behind the running ones (rows stay dense)."""
        req.status = Status.FINISHED
        if req in self.prefilling:
            i = self.prefilling.index(req)
            self.prefilling.pop(i)
            self._shift_prefills(from_index=i, first_row=len(self.running) + i + 1)
        elif req in self.waiting:
            self.waiting.remove(req)
            return
        elif req in self.running:
            self._remove_running(req)
        self.rows.use_rows(len(self.running) + len(self.prefilling))

    def _remove_running(self, req: Request) -> None:
        row, last = self.running.index(req), len(self.running) - 1
        if row != last:
            moved = self.running[last]
            # an upper bound: mid-postprocess its KV may hold one more position than kv_len says
            self.rows.move_row(last, row, moved.prompt_len + len(moved.output_ids))
            self.running[row] = moved
        self.running.pop()
        self._shift_prefills(from_index=0, first_row=last + 1)

    def _shift_prefills(self, from_index: int, first_row: int) -> None:
        """prefilling[from_index:] sit one row too high, from `first_row` on: move each down one."""
        for j, pre in enumerate(self.prefilling[from_index:]):
            self.rows.move_row(first_row + j, first_row + j - 1, pre.num_computed)

    def cancelled(self) -> list[Request]:
        return [r for r in self.all_requests() if r.cancelled]

    def all_requests(self) -> list[Request]:
        return [*self.running, *self.prefilling, *self.waiting]
