"""The continuous-batching engine: one thread owns the model; a step is schedule, run, postprocess."""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from llava_serve.engine.base import EngineBase
from llava_serve.engine.prepack import prepack_linears
from llava_serve.engine.request import Request
from llava_serve.engine.runner import ModelRunner
from llava_serve.engine.sampler import sample
from llava_serve.engine.scheduler import Scheduler
from llava_serve.engine.text import TextAssembler
from llava_serve.engine.threads import ThreadTuner
from llava_serve.errors import EngineDead, OutOfMemory, ServeError
from llava_serve.models.base import LoadedModel

log = logging.getLogger(__name__)
MAX_FAILED_STEPS = 3


class BatchEngine(EngineBase):
    name = "batch"
    calls_in_loop = True

    def __init__(
        self,
        lm: LoadedModel,
        max_running: int = 5,
        max_waiting: int = 64,
        prefill_token_budget: int = 8192,
        feature_cache_size: int = 64,
        adapt_threads: bool = True,
        prepack: bool = True,
    ) -> None:
        super().__init__(lm, max_running, max_waiting)
        if prepack and max_running > 1:  # CPU float32 only; see prepack.py
            prepack_linears(lm.model, rows_hint=max_running)
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.scheduler = Scheduler(max_running, prefill_token_budget)
        self.runner = ModelRunner(lm, max_running, feature_cache_size)
        self.eos = set(lm.eos_token_ids)
        on_cpu = adapt_threads and lm.device.type == "cpu"
        self.tuner = ThreadTuner(torch.get_num_threads() if on_cpu else 1)
        self.failed_steps = 0
        self.thread = threading.Thread(target=self._loop, name="llava-serve-engine", daemon=True)

    def start(self) -> BatchEngine:
        self.thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.inbox.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def _enqueue(self, req: Request) -> None:
        self.inbox.put(req)

    def _wake(self) -> None:
        self.inbox.put(None)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            self._run_loop()

    def _run_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain(block=not self.scheduler.has_work())
                self._drop_cancelled()
                self._run_calls()
                if self.scheduler.has_work():
                    self.busy_since = self.busy_since or time.monotonic()
                    self._guarded_step()
                    self.last_step = time.monotonic()
                else:
                    self.busy_since = None
        except BaseException as exc:  # the engine must never die silently
            log.exception("engine loop died")
            self.dead = exc
        finally:
            self._fail_all(EngineDead("the engine stopped before this request finished"))
            self._fail_calls(EngineDead("the engine stopped"))

    def _guarded_step(self) -> None:
        """A step that raises something unexpected (a model bug hit by one input, say) fails the
        requests in the running batch with a clear error and frees their slots; the waiting ones and
        later requests are served. Only after MAX_FAILED_STEPS such failures with no good decode
        step between them does the engine give up (it is then dead, /ready says so, and every
        request gets ENGINE_DEAD)."""
        try:
            self.step()
        except Exception as exc:
            self.failed_steps += 1
            log.exception("engine step failed (%d in a row)", self.failed_steps)
            if self.failed_steps >= MAX_FAILED_STEPS:
                raise
            error = ServeError(f"internal error while generating ({type(exc).__name__}); retry")
            self._fail(list(self.scheduler.running), error)
            for req in list(self.runner.rows):  # a row the scheduler no longer knows (should not happen)
                self.runner.release(req)

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is None:
                    pass
                elif item.max_new_tokens == 0:
                    self._finish(item, "length")
                else:
                    self.scheduler.add(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for req in self.scheduler.cancelled():
            self._leave(req, "abort")

    def step(self) -> None:
        """Decode the rows in the batch and send their tokens, then prefill the newcomers."""
        plan = self.scheduler.schedule()
        rows = list(self.runner.rows)
        if rows:
            try:
                tokens = sample(self._decode(), rows)
                self.failed_steps = 0
            except torch.OutOfMemoryError:
                log.exception("out of memory in a decode step")
                self._fail(rows + plan.prefill, OutOfMemory("out of memory while generating; retry with less"))
                return
            self._postprocess(rows, tokens)
        if plan.prefill:
            self._admit(plan.prefill)

    def _admit(self, newcomers: list[Request]) -> None:
        """Prefill each newcomer; its first token goes out as soon as its own prefill is done, and a
        request that fails (a bad image, too little memory) takes no other request with it."""
        try:
            features = self.runner.encode_images(newcomers)
        except torch.OutOfMemoryError:
            log.exception("out of memory encoding images")
            self._fail(newcomers, OutOfMemory("out of memory encoding the images; retry with fewer or smaller"))
            return
        except ServeError as exc:
            self._fail(newcomers, exc)
            return
        for i, req in enumerate(newcomers):
            try:
                logits = self._prefill(req, features)
            except torch.OutOfMemoryError:
                log.exception("out of memory in a prefill")
                self._fail(newcomers[i:], OutOfMemory("out of memory while reading the prompt; retry with less"))
                return
            except ServeError as exc:
                self._fail([req], exc)
                continue
            self._postprocess([req], sample(logits.unsqueeze(0), [req]))

    def _fail(self, requests: list[Request], error: ServeError) -> None:
        for req in requests:
            self._leave(req, "error", error)

    # the tuner probes thread counts on decode steps (short: a bad count costs one step) and
    # runs prefills, which take seconds under contention, at the count it chose
    def _decode(self) -> torch.Tensor:
        with self.tuner.timed(("decode", len(self.runner.rows))):
            return self.runner.decode()

    def _prefill(self, req: Request, features: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.tuner.timed(("prefill",), units=req.prompt_len, probe=False):
            return self.runner.prefill(req, features)

    def _postprocess(self, requests: list[Request], tokens: list[int]) -> None:
        now = time.monotonic()
        for req, token in zip(requests, tokens):
            if req.first_token_at is None:
                req.first_token_at = now
            reason = self._append(req, token)
            self.generated_tokens += 1
            if reason:
                self._leave(req, reason)
            else:
                self._emit(req)

    def _append(self, req: Request, token: int) -> str | None:
        req.output_ids.append(token)
        params = req.params
        if token in params.stop_token_ids or (token in self.eos and not params.ignore_eos):
            return "stop"
        assembler: TextAssembler = req.state
        if assembler.append(token):
            return "stop"
        if len(req.output_ids) >= req.max_new_tokens:
            return "length"
        return None

    def _leave(self, req: Request, reason: str, error: ServeError | None = None) -> None:
        if req in self.runner.rows:
            self.runner.release(req)
        self.scheduler.finish(req)
        self._finish(req, reason, error)

    def _fail_all(self, error: ServeError) -> None:
        self._drain(block=False)
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._leave(req, "error", error)
        with self._lock:
            stranded = list(self._accepted)
        for req in stranded:
            self._finish(req, "error", error)
