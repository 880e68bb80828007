"""The LLaVA way, kept as a baseline: one thread per request, each running `model.generate`.

LLaVA's model worker starts a thread per request that calls `model.generate` with a
`TextIteratorStreamer`; concurrent requests share the CPU/GPU but never a forward pass. This
engine does the same (at most `max_running` threads, the rest wait in the bounded queue that
`EngineBase.submit` enforces) and reports through the same `_emit`/`_finish` as `BatchEngine`, so
outputs have the same shape and the two engines can be compared behind the same worker.

Inputs are built from the `LoadedModel` alone (`embed(ids, image_features(units))`), so every
format the loader handles works. Sampling runs in a logits processor with a per-request
`torch.Generator` (the sampler `BatchEngine` uses), so a seed means the same thing in both engines;
greedy requests without a repetition penalty run plain `model.generate` greedy search.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from llava_serve.engine.base import EngineBase
from llava_serve.engine.request import FinishReason, Request, Status
from llava_serve.engine.sampler import apply_repetition_penalty, sample_row
from llava_serve.errors import EngineDead, InvalidParameter, OutOfMemory, ServeError
from llava_serve.models.base import LoadedModel

log = logging.getLogger(__name__)


class GenerateEngine(EngineBase):
    name = "generate"

    def __init__(self, lm: LoadedModel, max_running: int = 5, max_waiting: int = 64) -> None:
        super().__init__(lm, max_running, max_waiting)
        self.eos = list(lm.eos_token_ids)
        self._slots = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._threads: set[threading.Thread] = set()
        self._started = False

    def start(self) -> GenerateEngine:
        self._started = True
        return self

    def submit(self, req: Request) -> None:
        """The LLaVA-way baseline keeps to what LLaVA's worker offers; the rest is refused, not ignored."""
        p = req.params
        asked = [name for name, on in (("logprobs", p.logprobs is not None), ("presence_penalty", p.presence_penalty),
                                       ("frequency_penalty", p.frequency_penalty),
                                       ("response_format", req.constraint is not None)) if on]  # fmt: skip
        if asked:
            raise InvalidParameter(
                f"{asked[0]} is not offered by --engine generate (the LLaVA-way baseline); use --engine batch",
                param=asked[0],
            )
        super().submit(req)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking work; running generations stop at their next token and fail with EngineDead."""
        self._stopping.set()
        with self._slots:
            waiting, self._waiting = list(self._waiting), deque()
            threads = list(self._threads)
        error = EngineDead("the engine stopped before this request finished")
        for req in waiting:
            self._finish(req, "error", error)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def is_alive(self) -> bool:
        return self._started and not self._stopping.is_set()

    # -- admission: a thread per request, at most max_running at once ---------------------------
    def _enqueue(self, req: Request) -> None:
        if req.max_tokens == 0:
            self._finish(req, "length")
            return
        with self._slots:
            self._waiting.append(req)
        self._start_waiting()

    def _wake(self) -> None:
        """Called on abort: a cancelled request that is still waiting leaves at once."""
        with self._slots:
            cancelled = [r for r in self._waiting if r.cancelled]
            for req in cancelled:
                self._waiting.remove(req)
        for req in cancelled:
            self._finish(req, "abort")

    def _start_waiting(self) -> None:
        with self._slots:
            if self._stopping.is_set():
                stranded, self._waiting = list(self._waiting), deque()
            else:
                stranded = []
            while self._waiting and len(self._threads) < self.max_running:
                req = self._waiting.popleft()
                req.status = Status.RUNNING
                thread = threading.Thread(target=self._serve, args=(req,), name=f"generate-{req.request_id}")
                self._threads.add(thread)
                self.busy_since = self.busy_since or time.monotonic()
                thread.start()
        for req in stranded:
            self._finish(req, "error", EngineDead("the engine stopped before this request finished"))

    def _serve(self, req: Request) -> None:
        reason: FinishReason = "error"
        error: ServeError | None = ServeError("generation thread ended unexpectedly")
        try:
            reason, error = self._generate(req)
        except torch.OutOfMemoryError:
            log.exception("out of memory in %s", req.request_id)
            error = OutOfMemory("out of memory while generating; retry with less")
        except ServeError as exc:
            error = exc
        except Exception as exc:  # a failed generation ends its stream, never the engine
            log.exception("generation failed for %s", req.request_id)
            error = ServeError(f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            with self._slots:
                self._threads.discard(threading.current_thread())
                if not self._threads:
                    self.busy_since = None
            self._finish(req, reason, error)
            self._start_waiting()

    # -- one request -------------------------------------------------------------------------------
    def _generate(self, req: Request) -> tuple[FinishReason, ServeError | None]:
        streamer = _RequestStreamer(self, req)
        if req.cancelled:
            return "abort", None
        with torch.inference_mode():
            ids = torch.tensor([req.prompt.input_ids], device=self.lm.device)
            embeds = self.lm.embed(ids, self.lm.image_features(req.prompt.images))
            self.lm.model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(ids),
                generation_config=self._generation_config(req),
                logits_processor=_processors(req),
                stopping_criteria=StoppingCriteriaList([_Stop(self, req, streamer)]),
                streamer=streamer,
            )
        if self._stopping.is_set() and streamer.reason is None:
            return "error", EngineDead("the engine stopped before this request finished")
        if req.cancelled and streamer.reason is None:
            return "abort", None
        return streamer.reason or "length", None

    def _generation_config(self, req: Request) -> GenerationConfig:
        stop_ids = sorted(req.stop_ids)
        pad = self.lm.tokenizer.pad_token_id
        return GenerationConfig(
            max_new_tokens=req.max_tokens,
            do_sample=False,  # sampling, when asked for, happens in _RequestSampler
            eos_token_id=stop_ids,  # [] = never stop on a token
            pad_token_id=pad if pad is not None else (self.eos or [0])[0],
        )

    # -- called from request threads ----------------------------------------------------------------
    def _on_token(self, req: Request, token: int) -> FinishReason | None:
        """BatchEngine's rule (`Request.check_stop`): record the token, end the request or emit."""
        reason = req.check_stop(token)
        with self._lock:
            self.generated_tokens += 1
        self.last_step = time.monotonic()
        if reason is None:
            self._emit(req)
        return reason


class _RequestStreamer(BaseStreamer):
    """Receives each new token from `generate`; the first put() is the (empty) prompt."""

    def __init__(self, engine: GenerateEngine, req: Request) -> None:
        self.engine = engine
        self.req = req
        self.reason: FinishReason | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.reason is not None:
            return
        for token in value.reshape(-1).tolist():
            self.reason = self.engine._on_token(self.req, int(token))
            if self.reason is not None:
                return

    def end(self) -> None:
        pass


class _Stop(StoppingCriteria):
    """Ends generate() after a stop token/string, at the token limit, on cancel or shutdown."""

    def __init__(self, engine: GenerateEngine, req: Request, streamer: _RequestStreamer) -> None:
        self.engine = engine
        self.req = req
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        done = self.streamer.reason is not None or self.req.cancelled or self.engine._stopping.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _RequestSampler(LogitsProcessor):
    """Repetition penalty over prompt + output, then temperature/top-k/top-p with the request's RNG.

    The chosen token is returned as the only finite score, so generate's greedy step picks it.
    """

    def __init__(self, req: Request) -> None:
        self.req = req

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.FloatTensor:
        p = self.req.params
        row = scores[0].float()
        if p.repetition_penalty != 1.0:
            seen = self.req.prompt.input_ids + self.req.output_ids
            row = apply_repetition_penalty(row, seen, p.repetition_penalty)
        if p.greedy:
            return row.unsqueeze(0)  # type: ignore[return-value]
        assert self.req.generator is not None, "a sampling request has its generator from bind()"
        token = sample_row(row, p.temperature, p.top_k, p.top_p, self.req.generator)
        out = torch.full_like(row, float("-inf"))
        out[token] = 0.0
        return out.unsqueeze(0)  # type: ignore[return-value]


def _processors(req: Request) -> LogitsProcessorList:
    p = req.params
    if p.greedy and p.repetition_penalty == 1.0:
        return LogitsProcessorList()
    return LogitsProcessorList([_RequestSampler(req)])
