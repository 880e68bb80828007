"""`call_app`: a replica runs the worker app in-process, streaming, and a caller that leaves makes the
app clean up as a client's disconnect would (no Ray needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from llava_serve.common.streaming import ClosingStreamingResponse
from llava_serve.ray.asgi import HttpCall, HttpHead, call_app


def app_with(closed: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> JSONResponse:
        return JSONResponse(body, status_code=201, headers={"retry-after": "2"})

    @app.post("/stream")
    async def stream() -> ClosingStreamingResponse:
        async def frames() -> AsyncIterator[bytes]:
            for i in range(1000):
                yield f"{i}\0".encode()
                await asyncio.sleep(0.01)

        async def on_close() -> None:
            closed.append("closed")

        return ClosingStreamingResponse(frames(), on_close=on_close)

    return app


async def collect(app: FastAPI, call: HttpCall, limit: int | None = None) -> list[HttpHead | bytes]:
    items: list[HttpHead | bytes] = []
    answer = call_app(app, call)
    async for item in answer:
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    await answer.aclose()
    return items


def test_an_answer_is_its_head_then_its_body() -> None:
    call = HttpCall("POST", "/echo", b'{"a": 1}', (("content-type", "application/json"),))
    head, body = asyncio.run(collect(app_with([]), call))
    assert isinstance(head, HttpHead) and head.status == 201 and head.header("Retry-After") == "2"
    assert body == b'{"a":1}'


def test_a_stream_comes_chunk_by_chunk_and_leaving_closes_it() -> None:
    closed: list[str] = []
    items = asyncio.run(collect(app_with(closed), HttpCall("POST", "/stream"), limit=4))
    assert items[1:] == [b"0\0", b"1\0", b"2\0"]
    assert closed == ["closed"]  # the app saw its client leave and ran its cleanup


def test_an_unknown_route_is_the_apps_own_404() -> None:
    head, *_ = asyncio.run(collect(app_with([]), HttpCall("GET", "/nowhere")))
    assert isinstance(head, HttpHead) and head.status == 404
