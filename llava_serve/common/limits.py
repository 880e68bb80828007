"""Request bodies: a size limit enforced before they are read, and the errors FastAPI hides.

`add_body_limit(app, max_bytes)` installs a pure ASGI middleware (streams untouched) that refuses a
body whose Content-Length is over the limit before reading it, and stops reading one without a
Content-Length as soon as it goes over. `per_path` gives routes with small bodies a smaller limit.
It also counts, as the bytes arrive, the JSON values a body can hold (`{`, `[` and `,`): parsing
costs memory per value, not per byte (40 MB of empty chat messages cost 1.9 GB once parsed), so a
body with more than `max_items` is refused before it is parsed. The refusal is HTTP 413 in the
FastChat shape `{"text", "error_code": 40005}`; a service with another error shape (the OpenAI API)
passes `render`.

FastAPI turns any failure while it reads or decodes a body (this limit hit mid-body, JSON nested
past Python's recursion limit) into HTTP 400 `{"detail": "There was an error parsing the body"}`:
`body_error(exc)` gives back the typed error behind it, for each service to answer in its own shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException

from llava_serve.errors import InvalidRequest, RequestTooLarge, ServeError

Render = Callable[[RequestTooLarge], tuple[int, dict[str, Any]]]

# Far more than any real request holds (a 128k-token prompt of prose has ~10k commas; base64 none).
MAX_JSON_ITEMS = 100_000
SMALL_BODY = 64 * 1024  # routes that take a name or nothing
CLOSE = [(b"connection", b"close")]


def default_render(err: RequestTooLarge) -> tuple[int, dict[str, Any]]:
    return err.http_status, err.frame().body()


def add_body_limit(
    app: Any,
    max_bytes: int,
    render: Render = default_render,
    per_path: Mapping[str, int] | None = None,
    max_items: int = MAX_JSON_ITEMS,
) -> None:
    app.add_middleware(BodyLimit, max_bytes=max_bytes, render=render, per_path=per_path, max_items=max_items)


def body_error(exc: HTTPException) -> ServeError | None:
    """The typed error behind FastAPI's "error parsing the body", or None for any other HTTPException."""
    cause = exc.__cause__
    if isinstance(cause, ServeError):
        return cause
    if isinstance(cause, RecursionError):
        return InvalidRequest("the request body is JSON nested too deeply to parse")
    if cause is not None and exc.status_code == 400:
        return InvalidRequest(f"the request body could not be read ({type(cause).__name__})")
    return None


class BodyLimit:
    def __init__(
        self,
        app: Any,
        max_bytes: int,
        render: Render = default_render,
        per_path: Mapping[str, int] | None = None,
        max_items: int = MAX_JSON_ITEMS,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.render = render
        self.per_path = dict(per_path or {})
        self.max_items = max_items

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope["path"], self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, RequestTooLarge(f"request body larger than {limit} bytes"))
        seen = items = 0
        started = exceeded = False

        async def limited_receive():  # type: ignore[no-untyped-def]
            nonlocal seen, items, exceeded
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen += len(chunk)
                items += chunk.count(b"{") + chunk.count(b"[") + chunk.count(b",")
                exceeded = seen > limit or items > self.max_items
                if seen > limit:
                    raise RequestTooLarge(f"request body larger than {limit} bytes")
                if items > self.max_items:
                    raise RequestTooLarge(f"the request body holds more than {self.max_items} JSON values")
            return message

        async def tracking_send(message):  # type: ignore[no-untyped-def]
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if exceeded:  # the app answered the refusal itself (FastAPI's body errors): close too
                    message = {**message, "headers": [*message.get("headers", []), *CLOSE]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge as err:
            if not started:
                await self._refuse(send, err)

    async def _refuse(self, send, err: RequestTooLarge) -> None:  # type: ignore[no-untyped-def]
        status, body = self.render(err)
        # Close once answered, as nginx does: otherwise uvicorn reads (and drops) the rest of the body,
        # and a client sending 20 MB bodies in a loop kept the event loop busy for everyone else.
        headers = [(b"content-type", b"application/json"), *CLOSE]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
