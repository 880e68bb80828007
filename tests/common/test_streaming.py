"""ClosingStreamingResponse: the head goes out with the first chunk; the source is always closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llava_serve.common.streaming import ClosingStreamingResponse

pytestmark = pytest.mark.anyio


async def _call(response: ClosingStreamingResponse, sent: list[dict[str, Any]]) -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/"}
    await response(scope, receive, send)


async def test_nothing_is_sent_before_the_first_chunk_then_head_and_chunk() -> None:
    ready = asyncio.Event()
    closed = []

    async def frames() -> AsyncIterator[bytes]:
        await ready.wait()  # a prefill
        yield b"one\0"
        yield "two\0"  # type: ignore[misc]  # str chunks are encoded

    async def on_close() -> None:
        closed.append(True)

    sent: list[dict[str, Any]] = []
    task = asyncio.create_task(_call(ClosingStreamingResponse(frames(), on_close=on_close), sent))
    await asyncio.sleep(0.05)
    assert sent == []  # no status line while the first chunk is being made
    ready.set()
    await task
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert [m.get("body") for m in sent[1:]] == [b"one\0", b"two\0", b""]
    assert closed == [True]


async def test_an_empty_stream_still_answers() -> None:
    async def frames() -> AsyncIterator[bytes]:
        return
        yield b""

    sent: list[dict[str, Any]] = []
    await _call(ClosingStreamingResponse(frames()), sent)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_source_that_fails_before_its_first_chunk_is_closed_and_nothing_is_sent() -> None:
    closed = []

    async def frames() -> AsyncIterator[bytes]:
        raise RuntimeError("prefill failed")
        yield b""

    async def on_close() -> None:
        closed.append(True)

    sent: list[dict[str, Any]] = []
    with pytest.raises(RuntimeError):
        await _call(ClosingStreamingResponse(frames(), on_close=on_close), sent)
    assert sent == [] and closed == [True]
