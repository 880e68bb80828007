"""Call an ASGI app in-process and stream its answer: how a replica runs the worker's own routes.

The ingress sends a replica an `HttpCall` (method, path, headers, body); the replica runs it through
the worker app (`worker.app.create_app`, the same routes, checks and error bodies as a worker
process) and yields an `HttpHead`, then the body chunks as the app sends them (one frame per chunk
on a stream route). Leaving early (the ingress cancelled: its client went away) tells the app that
its client disconnected and, if it is still running after that, cancels it: either way the worker's
own cleanup aborts the generation in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio

# Messages the app may send ahead of the reader before `send` waits (a slow reader then gets fewer,
# larger frames: the worker keeps only the latest output of a request).
MAX_AHEAD = 2
_END = object()


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    query: str = ""


@dataclass(frozen=True)
class HttpHead:
    status: int
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


def scope_of(call: HttpCall) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in call.headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }


async def call_app(app: Any, call: HttpCall, *, grace: float = 5.0) -> AsyncIterator[HttpHead | bytes]:
    """The app's answer to `call`: its head, then its body chunks; the app's exception, if it fails."""
    messages: asyncio.Queue[Any] = asyncio.Queue()
    room = asyncio.Event()
    left = asyncio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        while messages.qsize() >= MAX_AHEAD and not left.is_set():
            room.clear()
            await room.wait()
        if left.is_set():
            raise OSError("the caller left")  # what a server's send does once its client is gone
        messages.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope_of(call), receive, send)
        finally:
            messages.put_nowait(_END)

    task = asyncio.create_task(run())
    complete = False
    try:
        while not complete and (message := await messages.get()) is not _END:
            room.set()
            if message["type"] == "http.response.start":
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", []))
                yield HttpHead(message["status"], headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                complete = not message.get("more_body", False)
        if not complete:  # as a server would say it: the app failed before its answer was whole
            failure = (await asyncio.gather(task, return_exceptions=True))[0]
            raise RuntimeError(f"{call.method} {call.path}: the app ended its answer early ({failure!r})")
    finally:
        left.set()
        room.set()
        with anyio.CancelScope(shield=True):
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
