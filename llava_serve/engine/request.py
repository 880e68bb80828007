"""A request's life in the engine, and what the engine reports back about it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from llava_serve.engine.params import SamplingParams
from llava_serve.errors import ServeError
from llava_serve.models.base import EncodedPrompt

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token: its log-probability and the top alternatives as (token id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    request_id: str
    text: str  # cumulative generated text, stop strings removed
    completion_tokens: int
    prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: ServeError | None = None
    logprobs: list[TokenLogprobs] | None = None  # every token's so far (the request's own list, append-only)


# Called from the engine thread; implementations hand the output over to their own thread/loop.
OutputSink = Callable[[RequestOutput], None]


@dataclass(eq=False)
class Request:
    prompt: EncodedPrompt
    params: SamplingParams
    sink: OutputSink
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    max_new_tokens: int = 0  # params.max_new_tokens clamped to the context
    first_token_at: float | None = None
    state: Any = None  # engine-private: text assembler, generator, KV row

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.input_ids)

    # set by the worker when asked for structured output / log-probabilities (see sampler.py)
    constraint: Any = None
    token_logprobs: list[TokenLogprobs] = field(default_factory=list)

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request before its next step."""
        self.cancelled = True
