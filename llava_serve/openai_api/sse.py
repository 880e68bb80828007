"""Server-sent events in OpenAI's streaming shape."""

from __future__ import annotations

import json
from dataclasses import dataclass

from llava_serve.errors import ServeError
from llava_serve.openai_api.errors import openai_error
from llava_serve.protocol.openai import ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, Usage


@dataclass(frozen=True)
class StreamHeader:
    """What every chunk of one streamed completion repeats."""

    id: str
    created: int
    model: str
    include_usage: bool


def chunk(
    header: StreamHeader,
    index: int | None,
    delta: Delta | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    logprobs: ChoiceLogprobs | None = None,
) -> str:
    """One `chat.completion.chunk`; index None makes the choice-less final usage chunk."""
    choices = (
        []
        if index is None
        else [ChunkChoice(index=index, delta=delta or Delta(), finish_reason=finish_reason, logprobs=logprobs)]
    )
    data = ChatCompletionChunk(
        id=header.id, created=header.created, model=header.model, choices=choices, usage=usage
    ).model_dump(exclude_none=True)
    for choice in data["choices"]:  # OpenAI sends these keys as null rather than leaving them out
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
    if header.include_usage:
        data["usage"] = usage.model_dump() if usage is not None else None
    return f"data: {json.dumps(data)}\n\n"


def error_event(err: ServeError) -> str:
    """A failure after the stream began: OpenAI clients raise on a chunk with an `error` key."""
    return f"data: {json.dumps(openai_error(err)[1])}\n\n"


def done() -> str:
    return "data: [DONE]\n\n"
