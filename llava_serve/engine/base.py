"""What every engine shares: admission (one counter, one place), output emission, health."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from llava_serve.engine.request import FinishReason, Request, RequestOutput, Status, TokenLogprobs
from llava_serve.errors import EngineDead, Overloaded, ServeError
from llava_serve.models.base import LoadedModel


@dataclass
class EngineStats:
    running: int
    waiting: int
    generated_tokens: int
    finished_requests: int
    last_step_age: float
    alive: bool


class EngineBase:
    """Subclasses implement _start_thread/_wake and call _emit/_finish from their model thread."""

    name = "base"
    calls_in_loop = False  # True: the engine's loop runs _run_calls between steps

    def __init__(self, lm: LoadedModel, max_running: int, max_waiting: int) -> None:
        self.lm = lm
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._accepted: set[Request] = set()
        self._stopping = threading.Event()
        self.dead: BaseException | None = None
        self.generated_tokens = 0
        self.finished_requests = 0
        self.last_step = time.monotonic()
        self.busy_since: float | None = None
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()

    # -- called from any thread ------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Accept a request or raise Overloaded / EngineDead; an accepted request always finishes."""
        if self.dead is not None or self._stopping.is_set():
            raise EngineDead(f"the engine is not running ({self.dead or 'shutting down'})")
        req.bind(self.lm.tokenizer, self.lm.context_length, self.lm.eos_token_ids)
        with self._lock:
            if len(self._accepted) >= self.max_running + self.max_waiting:
                raise Overloaded(
                    f"worker is at capacity ({self.max_running} running, {self.max_waiting} waiting); retry later",
                    retry_after=1.0,
                )
            self._accepted.add(req)
        self._enqueue(req)

    def abort(self, req: Request) -> None:
        req.cancel()
        self._wake()

    def abort_all(self) -> int:
        """Cancel every accepted request (each ends with finish_reason "abort"); returns how many."""
        with self._lock:
            accepted = list(self._accepted)
        for req in accepted:
            req.cancel()
        self._wake()
        return len(accepted)

    def run_on_engine_thread(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the thread that owns the model, between steps. A forward pass on any other
        thread starts a second OpenMP team and slows every later step (docs/benchmark.md)."""
        future: Future = Future()
        self._calls.put((fn, future))
        if not self.calls_in_loop:  # a thread per call, as such an engine has a thread per request
            threading.Thread(target=self._run_calls, name="llava-serve-call", daemon=True).start()
        self._wake()
        if self.dead is not None or self._stopping.is_set():  # no loop will run it
            self._fail_calls(EngineDead("the engine is not running"))
        return future

    def queue_length(self) -> int:
        with self._lock:
            return len(self._accepted)

    def stats(self) -> EngineStats:
        with self._lock:
            accepted = list(self._accepted)
        running = sum(1 for r in accepted if r.status == Status.RUNNING)
        return EngineStats(
            running=running,
            waiting=len(accepted) - running,
            generated_tokens=self.generated_tokens,
            finished_requests=self.finished_requests,
            last_step_age=time.monotonic() - self.last_step,
            alive=self.is_alive(),
        )

    def is_alive(self) -> bool:
        raise NotImplementedError

    def is_ready(self, stall_seconds: float = 30.0) -> bool:
        """Alive, and if it has work, it made a step recently."""
        if not self.is_alive() or self.dead is not None:
            return False
        busy = self.busy_since
        return busy is None or time.monotonic() - max(busy, self.last_step) < stall_seconds

    # -- subclass hooks ----------------------------------------------------------------------
    def start(self) -> EngineBase:
        raise NotImplementedError

    def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def _enqueue(self, req: Request) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        pass

    # -- called from the model thread --------------------------------------------------------
    def _run_calls(self) -> None:
        """Run the calls queued by run_on_engine_thread (the loop calls this between steps)."""
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller gets it; the engine goes on
                    future.set_exception(exc)

    def _fail_calls(self, error: BaseException) -> None:
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _emit(self, req: Request) -> None:
        assert req.detokenizer is not None
        before = req.detokenizer.emitted
        text = req.detokenizer.visible()
        if text == before and req.output_ids[:-1]:
            return  # nothing new to show (a partial character or a possible stop string)
        req.sink(
            RequestOutput(
                req.request_id, text, len(req.output_ids), req.prompt_len, finished=False, logprobs=_logprobs(req)
            )
        )

    def _finish(self, req: Request, reason: FinishReason, error: ServeError | None = None) -> None:
        """The one place an accepted request leaves: its final output, then its slot is free."""
        req.status = Status.FINISHED
        with self._lock:
            if req not in self._accepted:
                return
            self._accepted.discard(req)
            self.finished_requests += 1
        req.finish_reason = reason
        out = RequestOutput(
            req.request_id,
            req.detokenizer.visible(final=True) if req.detokenizer else "",
            len(req.output_ids),
            req.prompt_len,
            finished=True,
            finish_reason=reason,
            error=error,
            logprobs=_logprobs(req),
        )
        req.sink(out)


def _logprobs(req: Request) -> list[TokenLogprobs] | None:
    return req.token_logprobs if req.params.logprobs is not None else None
