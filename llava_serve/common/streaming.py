"""A streaming response that always releases what it streams from, and answers with its first chunk.

Whichever way a response ends (done, client disconnected, task cancelled), the body generator's
`aclose()` runs and then `on_close`. The generator's own `finally` is not enough: a client that
leaves before the first chunk means the generator never started, so its `finally` never runs,
and an upstream response opened before the generator would stay open. Starlette alone also
leaves the generator to the garbage collector when `send` fails (ASGI >= 2.4).

The status line and headers wait for the first chunk and go out with it. Every stream here is a
generation whose first chunk comes after the prompt's prefill; headers sent before it woke every
process on the path (worker -> controller -> API -> client) in the middle of the prefill, on the
cores the prefill runs on: through the API, that cost the first token ~1-2 ms on a 2-core machine
(docs/benchmark.md, "API overhead"). It also makes one write of the head and the first frame.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    def __init__(self, content: Any, *, on_close: Callable[[], Awaitable[None]] | None = None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._source = content
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        chunks = self.body_iterator.__aiter__()
        try:
            first: bytes | memoryview | str | None = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        await send(start)
        if first is not None:
            await send({"type": "http.response.body", "body": self._bytes(first), "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": self._bytes(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _bytes(self, chunk: bytes | memoryview | str) -> bytes | memoryview:
        return chunk.encode(self.charset) if isinstance(chunk, str) else chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                if inspect.isasyncgen(self._source):
                    await self._source.aclose()
                if self._on_close is not None:
                    await self._on_close()
