"""Bearer-key and shared-secret checks for the HTTP services.

`add_bearer_auth(app, keys)` installs a pure ASGI middleware (it never buffers a streaming
response, unlike BaseHTTPMiddleware) that refuses any request outside the exempt paths unless it
carries `Authorization: Bearer <one of keys>`. An empty key set turns the check off. The refusal is
HTTP 401 with the FastChat-style body `{"text": ..., "error_code": 40101 | 40102}` (no key / wrong
key); a service with another error shape (the OpenAI API) passes its own `render`.

Keys are compared by SHA-256 digest with `hmac.compare_digest`, against every accepted key, so the
time taken says nothing about how much of a key matched or which key was close.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from llava_serve.errors import ErrorCode, Unauthorized

DEFAULT_EXEMPT_PATHS = frozenset({"/health"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Render = Callable[[Unauthorized], tuple[int, dict[str, Any]]]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def secret_matches(given: str | None, expected: str) -> bool:
    """Constant-time check of one shared secret (e.g. X-Registration-Secret)."""
    return hmac.compare_digest(_digest(given or ""), _digest(expected)) and given is not None


class KeySet:
    """Accepted bearer keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise `Unauthorized` (40101 no key, 40102 wrong key) unless the header carries a key."""
        if not self.enabled:
            return
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code=ErrorCode.INVALID_AUTH_KEY)
        given = _digest(token)
        matched = False
        for d in self._digests:  # no early exit: every key costs the same
            matched |= hmac.compare_digest(given, d)
        if not matched:
            raise Unauthorized("incorrect API key", code=ErrorCode.INCORRECT_AUTH_KEY)


def bearer_headers(key: str | None) -> dict[str, str]:
    """Headers that present `key` to a service that checks bearer keys (none if no key)."""
    return {"authorization": f"Bearer {key}"} if key else {}


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def default_render(err: Unauthorized) -> tuple[int, dict[str, Any]]:
    return err.http_status, err.frame().body()


class BearerAuthMiddleware:
    """ASGI middleware: HTTP requests to non-exempt paths need a valid bearer key."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeySet,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
        render: Render = default_render,
    ) -> None:
        self.app = app
        self.keys = keys
        self.exempt_paths = frozenset(exempt_paths)
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        try:
            self.keys.check(_header(scope, b"authorization"))
        except Unauthorized as err:
            await _send_json(send, *self.render(err), extra_headers=[(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


def add_bearer_auth(
    app: Any,
    keys: Iterable[str],
    *,
    exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
    render: Render = default_render,
) -> KeySet:
    """Install the bearer check on a FastAPI/Starlette app; returns the key set it uses."""
    key_set = KeySet(keys)
    app.add_middleware(BearerAuthMiddleware, keys=key_set, exempt_paths=exempt_paths, render=render)
    return key_set


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _send_json(send: Send, status: int, body: dict[str, Any], extra_headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra_headers})
    await send({"type": "http.response.body", "body": payload})
