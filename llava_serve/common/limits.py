"""Request bodies: a size limit enforced before they are read, and the errors FastAPI hides.

`add_body_limit(app, max_bytes)` installs a pure ASGI middleware (streams untouched) that refuses a
body whose Content-Length is over the limit before reading it, and stops reading one without a
Content-Length as soon as it goes over. The refusal is HTTP 413 in the FastChat shape
`{"text", "error_code": 40005}`; a service with another error shape (the OpenAI API) passes `render`.

FastAPI turns any failure while it reads or decodes a body (this limit hit mid-body, JSON nested
past Python's recursion limit) into HTTP 400 `{"detail": "There was an error parsing the body"}`:
`body_error(exc)` gives back the typed error behind it, for each service to answer in its own shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

from llava_serve.errors import InvalidRequest, RequestTooLarge, ServeError

Render = Callable[[RequestTooLarge], tuple[int, dict[str, Any]]]


def default_render(err: RequestTooLarge) -> tuple[int, dict[str, Any]]:
    return err.http_status, err.frame().body()


def add_body_limit(app: Any, max_bytes: int, render: Render = default_render) -> None:
    app.add_middleware(BodyLimit, max_bytes=max_bytes, render=render)


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
    def __init__(self, app: Any, max_bytes: int, render: Render = default_render) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.render = render

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0
        started = False

        async def limited_receive():  # type: ignore[no-untyped-def]
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge(f"request body larger than {self.max_bytes} bytes")
            return message

        async def tracking_send(message):  # type: ignore[no-untyped-def]
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:  # type: ignore[no-untyped-def]
        status, body = self.render(RequestTooLarge(f"request body larger than {self.max_bytes} bytes"))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
