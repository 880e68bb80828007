"""Cancel a request's work when its client goes away (for non-streaming responses).

Starlette does not cancel a handler whose client disconnected; a long generation would run on
for nobody. `cancel_on_disconnect` runs the work as a task beside a watcher of `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client left before the answer was ready; the work was cancelled."""


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def add_disconnect_handler(app: Any) -> None:
    """A client that leaves while its body is read is not a server error: no traceback, no 500."""

    async def left(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)

    app.add_exception_handler(ClientDisconnect, left)
