"""Server-sent events in OpenAI's streaming shape."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llava_serve.errors import ServeError
from llava_serve.openai_api.errors import openai_error
from llava_serve.protocol.openai import Usage

if TYPE_CHECKING:
    from llava_serve.openai_api.serving import ChatStream


def chunk(
    stream: ChatStream,
    index: int | None,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> str:
    """One `chat.completion.chunk`; index None makes the choice-less final usage chunk."""
    choices = (
        []
        if index is None
        else [{"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]
    )
    data: dict[str, Any] = {
        "id": stream.id,
        "object": "chat.completion.chunk",
        "created": stream.created,
        "model": stream.model,
        "choices": choices,
    }
    if stream.include_usage:
        data["usage"] = usage.model_dump() if usage is not None else None
    return f"data: {json.dumps(data)}\n\n"


def error_event(err: ServeError) -> str:
    """A failure after the stream began: OpenAI clients raise on a chunk with an `error` key."""
    return f"data: {json.dumps(openai_error(err)[1])}\n\n"


def done() -> str:
    return "data: [DONE]\n\n"
