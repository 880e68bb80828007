"""The continuous-batching engine: one thread owns the model; a step is schedule, run, postprocess."""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from llava_serve.engine.base import EngineBase
from llava_serve.engine.kernel_caches import bound_kernel_caches
from llava_serve.engine.request import FinishReason, Request
from llava_serve.engine.runners import build_runner
from llava_serve.engine.sampler import sample
from llava_serve.engine.scheduler import Batch, Scheduler
from llava_serve.engine.step_costs import StepCosts
from llava_serve.engine.threads import ThreadTuner
from llava_serve.errors import EngineDead, OutOfMemory, ServeError
from llava_serve.models.base import LoadedModel

log = logging.getLogger(__name__)
MAX_FAILED_STEPS = 3
# tokens one step handles while streams are decoding, per request waiting for its first token
# (decode rows + prompt chunks), and at most a step; see the scheduler and docs/benchmark.md
STEP_TOKENS = 32
MAX_STEP_TOKENS = 256


class BatchEngine(EngineBase):
    name = "batch"
    calls_in_loop = True

    def __init__(
        self,
        lm: LoadedModel,
        max_running: int = 5,
        max_waiting: int = 64,
        step_tokens: int = STEP_TOKENS,
        max_step_tokens: int = MAX_STEP_TOKENS,
        feature_cache_size: int = 64,
        adapt_threads: bool = True,
        prepack: bool = True,
        prefix_cache_bytes: int = 256 << 20,
        runner: str = "auto",
        quantization: str | None = None,
    ) -> None:
        super().__init__(lm, max_running, max_waiting)
        bound_kernel_caches(max_running)  # no effect where a kernel was made already (kernel_caches.py)
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.runner = build_runner(
            lm, max_running, feature_cache_size, prepack, prefix_cache_bytes, runner, quantization
        )
        chunk_budget = step_tokens if self.runner.chunked else None
        self.costs = StepCosts()
        self.scheduler = Scheduler(max_running, self.runner, chunk_budget, max_step_tokens, self.costs)
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
        requests in its batch with a clear error and frees their slots; the waiting ones and
        later requests are served. Only after MAX_FAILED_STEPS such failures with no good step
        between them does the engine give up (it is then dead, /ready says so, and every
        request gets ENGINE_DEAD)."""
        try:
            self.step()
        except Exception as exc:
            self.failed_steps += 1
            log.exception("engine step failed (%d in a row)", self.failed_steps)
            if self.failed_steps >= MAX_FAILED_STEPS:
                raise
            error = ServeError(f"internal error while generating ({type(exc).__name__}); retry")
            self._fail(self._in_batch(), error)

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is None:
                    pass
                elif item.max_tokens == 0:
                    self._finish(item, "length")
                else:
                    self.scheduler.add(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for req in self.scheduler.cancelled():
            self._leave(req, "abort")

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        batch = self.scheduler.schedule()
        started = time.perf_counter()
        newcomers = self._prepare(batch)
        prepared = time.perf_counter()
        self.costs.observe_images(newcomers, prepared - started)
        if not batch.decode and not batch.prefill:
            return
        try:
            logits = self._run(batch)
        except torch.OutOfMemoryError:
            log.exception("out of memory in a step")
            self._fail(self._in_batch(), OutOfMemory("out of memory while generating; retry with less"))
            return
        self.costs.observe_step(len(batch.decode), batch.prompt_tokens, time.perf_counter() - prepared)
        self.failed_steps = 0
        self._postprocess(batch, logits)

    def _prepare(self, batch: Batch) -> int:
        """Newcomers' images and embeddings (returns how many began); a request that fails here
        leaves the batch and takes no other with it."""
        fresh = [r for r in batch.prefill if r.prompt_embeds is None and not r.num_computed]
        # the batch's newcomers' images go in one vision batch; with nothing decoding, the next
        # waiting ones' too
        later = [] if batch.decode else list(self.scheduler.waiting)[: self.max_running - 1]
        for i, req in enumerate(fresh):
            try:
                self.runner.begin_prefill(req, len(batch.decode) + batch.prefill.index(req), [*fresh[i + 1 :], *later])
            except torch.OutOfMemoryError:
                log.exception("out of memory encoding a prompt")
                batch.drop(req)
                self._leave(req, "error", OutOfMemory("out of memory encoding the images; retry with fewer or smaller"))
            except ServeError as exc:
                batch.drop(req)
                self._leave(req, "error", exc)
        return len(fresh)

    # the tuner probes thread counts on decode-only steps (short: a bad count costs one step);
    # steps that read a prompt run at the count it chose
    def _run(self, batch: Batch) -> torch.Tensor:
        if not batch.prefill:
            with self.tuner.timed(("decode", len(batch.decode))):
                return self.runner.run(batch)
        with self.tuner.timed(("prefill",), units=batch.prompt_tokens + len(batch.decode), probe=False):
            return self.runner.run(batch)

    def _postprocess(self, batch: Batch, logits: torch.Tensor) -> None:
        rows = list(batch.decode)
        for req in batch.prefill:
            if req.prefilled:
                self.scheduler.promote(req)
                rows.append(req)
        if not rows:
            return
        for req, token in zip(rows, sample(logits, rows), strict=True):
            reason = req.check_stop(token)
            self.generated_tokens += 1
            if reason:
                self._leave(req, reason)
            else:
                self._emit(req)

    # -- leaving -----------------------------------------------------------------------------
    def _leave(self, req: Request, reason: FinishReason, error: ServeError | None = None) -> None:
        if reason != "error" and req in self.scheduler.running:
            self.runner.retain(req, self.scheduler.running.index(req))
        self.scheduler.finish(req)
        self._finish(req, reason, error)

    def _in_batch(self) -> list[Request]:
        return [*self.scheduler.running, *self.scheduler.prefilling]

    def _fail(self, requests: list[Request], error: ServeError) -> None:
        for req in requests:
            self._leave(req, "error", error)

    def _fail_all(self, error: ServeError) -> None:
        self._drain(block=False)
        self._fail(self.scheduler.all_requests(), error)
        with self._lock:
            stranded = list(self._accepted)
        for req in stranded:
            self._finish(req, "error", error)
