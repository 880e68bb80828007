"""One answer, start to end: find a worker, have it build the prompt, stream the generation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llava_serve.errors import InvalidRequest
from llava_serve.web.client import ControllerClient
from llava_serve.web.conversation import ModelRequest, encode_image


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_new_tokens: int


async def stream_answer(
    client: ControllerClient,
    model: str | None,
    request: ModelRequest,
    params: SamplingParams,
    max_image_side: int,
) -> AsyncIterator[str]:
    """The answer's text so far, each time more of it arrives (raises `ServeError` on failure)."""
    if not model:
        raise InvalidRequest("no model is selected; is a worker registered? Press the refresh button")
    address = await client.worker_address(model)
    prompt = await client.build_prompt(address, request.messages)
    images = await asyncio.to_thread(_encode_all, request.image_paths, max_image_side)
    payload = {
        "model": model,
        "prompt": prompt,
        "images": images,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": int(params.max_new_tokens),
        "echo": False,
    }
    async for frame in client.generate_stream(payload):
        yield _answer_text(str(frame.get("text", "")), prompt)


def _encode_all(paths: list[str], max_side: int) -> list[str]:
    return [encode_image(p, max_side) for p in paths]


def _answer_text(text: str, prompt: str) -> str:
    # Workers that ignore `echo` (LLaVA's own) repeat the prompt at the start of every frame.
    if prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    return text.lstrip()
