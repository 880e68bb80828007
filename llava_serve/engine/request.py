"""A request's life in the engine, and what the engine reports back about it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch

from llava_serve.engine.params import SamplingParams
from llava_serve.engine.text import TextAssembler
from llava_serve.errors import ServeError
from llava_serve.models.base import EncodedPrompt

_ids = itertools.count()

FinishReason = Literal["stop", "length", "abort", "error"]


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
    finish_reason: FinishReason | None = None
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
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    # set by bind() when an engine accepts the request
    max_tokens: int = 0  # params.max_new_tokens clamped to what the context has room for
    detokenizer: TextAssembler | None = None
    generator: torch.Generator | None = None  # sampling requests only: their own RNG (seeded or not)
    stop_ids: frozenset[int] = frozenset()  # the request's stop_token_ids, plus EOS unless ignore_eos
    # prefill progress in the batch engine: prompt positions whose KV is cached, the prompt's embeddings
    num_computed: int = 0
    prompt_embeds: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.input_ids)

    # set by the worker when asked for structured output / log-probabilities (see sampler.py)
    constraint: Any = None
    token_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def kv_len(self) -> int:
        """Positions whose keys and values are cached (the last sampled token is not fed yet)."""
        return self.prompt_len + len(self.output_ids) - 1 if self.output_ids else self.num_computed

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= self.prompt_len

    def bind(self, tokenizer: Any, context_length: int, eos_ids: list[int]) -> None:
        """Everything an engine needs to generate for this request, made once at admission."""
        p = self.params
        self.max_tokens = max(0, min(p.max_new_tokens, context_length - self.prompt_len))
        self.detokenizer = TextAssembler(tokenizer, p.stop)
        self.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(eos_ids))
        if not p.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(p.seed) if p.seed is not None else self.generator.seed()

    def check_stop(self, token: int) -> FinishReason | None:
        """Record a generated token; the reason the request ends with it, if it does (both engines' rule)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.output_ids.append(token)
        if token in self.stop_ids:
            return "stop"
        assert self.detokenizer is not None, "check_stop before bind"
        if self.detokenizer.append(token):
            return "stop"
        if len(self.output_ids) >= self.max_tokens:
            return "length"
        return None

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request before its next step."""
        self.cancelled = True
