"""common/auth: bearer keys (no key / wrong key codes), exempt paths, shared-secret check."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from llava_serve.common.auth import KeySet, add_bearer_auth, bearer_token, secret_matches
from llava_serve.errors import ErrorCode, Unauthorized


def _app(keys: list[str]) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/work")
    async def work() -> StreamingResponse:
        return StreamingResponse(iter([b"a\0", b"b\0"]))

    add_bearer_auth(app, keys)
    return app


async def _post(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        if path == "/health":
            return await client.get(path, headers=headers)
        return await client.post(path, headers=headers)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        (None, 401, ErrorCode.INVALID_AUTH_KEY),
        ({"Authorization": "Bearer"}, 401, ErrorCode.INVALID_AUTH_KEY),
        ({"Authorization": "Basic k1"}, 401, ErrorCode.INVALID_AUTH_KEY),
        ({"Authorization": "Bearer nope"}, 401, ErrorCode.INCORRECT_AUTH_KEY),
        ({"Authorization": "Bearer k1x"}, 401, ErrorCode.INCORRECT_AUTH_KEY),
        ({"Authorization": "Bearer k1"}, 200, None),
        ({"Authorization": "bearer  k2 "}, 200, None),
    ],
)
async def test_bearer_keys(headers: dict[str, str] | None, status: int, code: ErrorCode | None) -> None:
    resp = await _post(_app(["k1", "k2"]), "/work", headers)
    assert resp.status_code == status
    if code is None:
        assert resp.content == b"a\0b\0"
    else:
        body = resp.json()
        assert body["error_code"] == int(code)
        assert "key" in body["text"]
        assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.anyio
async def test_health_exempt_and_empty_keys_mean_off() -> None:
    assert (await _post(_app(["k1"]), "/health")).status_code == 200
    assert (await _post(_app([]), "/work")).status_code == 200


def test_keyset_and_secret() -> None:
    keys = KeySet(["a", ""])
    assert keys.enabled and not KeySet([""]).enabled
    keys.check("Bearer a")
    with pytest.raises(Unauthorized) as info:
        keys.check("Bearer b")
    assert info.value.code == ErrorCode.INCORRECT_AUTH_KEY
    assert bearer_token("Bearer  t ") == "t" and bearer_token("Token t") is None
    assert secret_matches("s3cret", "s3cret")
    assert not secret_matches("s3cre", "s3cret")
    assert not secret_matches(None, "s3cret")
    assert not secret_matches("", "s3cret")
