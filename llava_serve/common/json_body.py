"""Read any POST body as JSON, whatever its Content-Type, on the LLaVA/FastChat routes.

LLaVA's and FastChat's workers and controller call `await request.json()`, which ignores the
header, so clients (and the curl lines in their READMEs) send JSON without
`Content-Type: application/json`. FastAPI refuses such a body ("Input should be a valid
dictionary"). This pure ASGI middleware marks POST bodies as JSON before FastAPI sees them; a body
that is not JSON still gets the route's clear 400.
"""

from __future__ import annotations

from typing import Any

JSON = b"application/json"


class JsonBodyAnyContentType:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", JSON)]}
        await self.app(scope, receive, send)


def add_json_body(app: Any) -> None:
    app.add_middleware(JsonBodyAnyContentType)
