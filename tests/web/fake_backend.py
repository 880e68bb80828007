"""A fake controller and worker in one process, for the web demo's tests.

    python -m tests.web.fake_backend --port 31001 --word-delay 0.15 [--api-key K]

It serves the controller routes the demo uses (/list_models and the /worker_chat_stream proxy,
which renders the messages as a LLaVA worker would), plus /worker_generate_stream for
LLaVA-protocol clients. The answer is real in one sense: it names the dominant colour of the last image,
computed from its pixels, streamed word by word as cumulative `\\0`-delimited frames.

Models: `fake-llava` answers; `fake-broken` fails after two words with an error frame (as a
worker running out of memory would); `fake-busy` is refused with HTTP 429 and Retry-After.
Test-only routes: GET /stats (active / completed / cancelled streams), GET /last_request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import colorsys
import io
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from llava_serve.common.auth import add_bearer_auth
from llava_serve.common.streaming import ClosingStreamingResponse
from llava_serve.errors import ErrorCode
from llava_serve.protocol.frames import FinishReason, Frame, Usage, encode_frame

GOOD, BROKEN, BUSY = "fake-llava", "fake-broken", "fake-busy"
MODELS = [GOOD, BROKEN, BUSY]
ACHROMATIC = ("white", "grey", "black")


@dataclass
class FakeState:
    url: str
    word_delay: float
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    last_request: dict[str, Any] = field(default_factory=dict)


def dominant_colour(img: Image.Image) -> str:
    """The commonest colour name among the pixels; white/grey/black only if little else is there."""
    small = img.convert("RGB").resize((64, 64))
    counts = Counter(_colour_name(*px) for px in small.getdata())
    chromatic = [(n, c) for c, n in counts.items() if c not in ACHROMATIC]
    if chromatic and sum(n for n, _ in chromatic) >= 0.05 * 64 * 64:
        return max(chromatic)[1]
    return counts.most_common(1)[0][0]


def _colour_name(r: int, g: int, b: int) -> str:
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    if v < 0.2:
        return "black"
    if s < 0.25:
        return "white" if v > 0.85 else "grey"
    hue = h * 360
    for limit, name in (
        (15, "red"),
        (40, "orange"),
        (70, "yellow"),
        (165, "green"),
        (195, "cyan"),
        (255, "blue"),
        (290, "purple"),
        (335, "pink"),
    ):
        if hue < limit:
            return name
    return "red"


def answer_words(images: list[str]) -> list[str]:
    if not images:
        sentence = "I cannot see any picture, so I cannot tell its colour."
    else:
        with Image.open(io.BytesIO(base64.b64decode(images[-1], validate=True))) as img:
            sentence = f"Looking at the picture, the main colour I see is {dominant_colour(img)}."
    return sentence.split(" ")


def _error(status: int, message: str, code: ErrorCode, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(Frame.failure(int(code), message).body(), status_code=status, headers=headers)


def build_prompt(messages: list[dict[str, Any]]) -> str:
    """LLaVA v1 style: `USER: <image>\\nquestion ASSISTANT: answer</s>...` ending in `ASSISTANT:`."""
    lines = []
    for m in messages:
        parts = m["content"]
        images = "<image>\n" * sum(1 for p in parts if p["type"] == "image")
        text = " ".join(p["text"] for p in parts if p["type"] == "text")
        role = "USER" if m["role"] == "user" else "ASSISTANT"
        lines.append(f"{role}: {images}{text}" + ("</s>" if role == "ASSISTANT" else ""))
    return " ".join(lines) + " ASSISTANT:"


async def _frames(state: FakeState, model: str, words: list[str]) -> AsyncIterator[bytes]:
    state.active += 1
    finished = False
    try:
        for i, _ in enumerate(words):
            if model == BROKEN and i == 2:
                oom = int(ErrorCode.CUDA_OUT_OF_MEMORY)
                message = "worker ran out of GPU memory while decoding"
                yield encode_frame(Frame.failure(oom, message, finish_reason=FinishReason.ERROR))
                finished = True
                return
            await asyncio.sleep(state.word_delay)
            yield encode_frame(Frame(text=" ".join(words[: i + 1])))
        usage = Usage.of(10, len(words))
        yield encode_frame(Frame(text=" ".join(words), finish_reason=FinishReason.STOP, usage=usage))
        finished = True
    finally:
        state.active -= 1
        if finished:
            state.completed += 1
        else:
            state.cancelled += 1


def create_app(url: str, word_delay: float, api_key: str | None = None) -> FastAPI:
    app = FastAPI()
    state = FakeState(url=url, word_delay=word_delay)
    if api_key:
        add_bearer_auth(app, [api_key], exempt_paths={"/health", "/stats", "/last_request"})

    @app.post("/list_models")
    async def list_models() -> dict[str, Any]:
        return {"models": MODELS}

    @app.post("/worker_chat_stream")
    async def worker_chat_stream(request: Request) -> Any:
        body = await request.json()
        try:
            prompt = build_prompt(body["messages"])
        except (KeyError, TypeError) as exc:
            return _error(400, f"bad messages: {exc!r}", ErrorCode.VALIDATION_TYPE_ERROR)
        return _generate(state, {**body, "prompt": prompt})

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Any:
        return _generate(state, await request.json())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return {"active": state.active, "completed": state.completed, "cancelled": state.cancelled}

    @app.get("/last_request")
    async def last_request() -> dict[str, Any]:
        return state.last_request

    return app


def _generate(state: FakeState, body: dict[str, Any]) -> Any:
    state.last_request = body
    model, prompt, images = body.get("model"), body.get("prompt", ""), body.get("images") or []
    if model not in MODELS:
        return _error(404, f"model {model!r} does not exist", ErrorCode.INVALID_MODEL)
    if model == BUSY:
        return _error(
            429,
            "worker overloaded: 5 requests running and the queue is full",
            ErrorCode.ENGINE_OVERLOADED,
            {"Retry-After": "3"},
        )
    if prompt.count("<image>") != len(images):
        return _error(
            400,
            f"prompt has {prompt.count('<image>')} <image> tokens but {len(images)} images were sent",
            ErrorCode.IMAGE_COUNT_MISMATCH,
        )
    try:
        words = answer_words(images)
    except (binascii.Error, ValueError, OSError) as exc:
        return _error(400, f"cannot decode the image: {exc}", ErrorCode.INVALID_IMAGE)
    return ClosingStreamingResponse(_frames(state, model, words), media_type="application/octet-stream")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--word-delay", type=float, default=0.15)
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    app = create_app(f"http://{args.host}:{args.port}", args.word_delay, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
