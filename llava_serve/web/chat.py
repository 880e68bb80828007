"""One answer, start to end: one chat generation on the controller (the worker that generates
renders the conversation with the model's own template)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llava_serve.cluster.client import ClusterClient
from llava_serve.errors import InvalidRequest
from llava_serve.protocol.worker import ChatRequest, ChatTurn
from llava_serve.web.conversation import ModelRequest, encode_image


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_new_tokens: int


async def stream_answer(
    client: ClusterClient,
    model: str | None,
    request: ModelRequest,
    params: SamplingParams,
    max_image_side: int,
) -> AsyncIterator[str]:
    """The answer's text so far, each time more of it arrives (raises `ServeError` on failure)."""
    if not model:
        raise InvalidRequest("no model is selected; is a worker registered? Press the refresh button")
    images = await asyncio.to_thread(_encode_all, request.image_paths, max_image_side)
    body = ChatRequest(
        model=model,
        messages=[ChatTurn.model_validate(m) for m in request.messages],
        images=images,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=int(params.max_new_tokens),
    )
    stream = await client.chat(body)
    async for frame in stream:
        yield frame.text.lstrip()


def _encode_all(paths: list[str], max_side: int) -> list[str]:
    return [encode_image(p, max_side) for p in paths]
