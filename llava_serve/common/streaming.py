"""A streaming response that always releases what it streams from.

Whichever way a response ends (done, client disconnected, task cancelled), the body generator's
`aclose()` runs and then `on_close`. The generator's own `finally` is not enough: a client that
leaves before the first chunk means the generator never started, so its `finally` never runs,
and an upstream response opened before the generator would stay open. Starlette alone also
leaves the generator to the garbage collector when `send` fails (ASGI >= 2.4).
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                if inspect.isasyncgen(self._source):
                    await self._source.aclose()
                if self._on_close is not None:
                    await self._on_close()
