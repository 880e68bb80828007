"""create_app(config): the OpenAI-compatible API as a FastAPI app, all state on app.state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from llava_serve.cluster.client import Cluster, ClusterClient
from llava_serve.common.auth import add_bearer_auth
from llava_serve.common.disconnect import add_disconnect_handler
from llava_serve.common.limits import add_body_limit, body_error
from llava_serve.errors import InvalidRequest, Overloaded, RequestTooLarge, ServeError, Unauthorized
from llava_serve.openai_api.completions import CompletionService
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.errors import RouteError, openai_error
from llava_serve.openai_api.images import ImageFetcher, Resolver, system_resolver
from llava_serve.openai_api.routes import ApiState, router
from llava_serve.openai_api.serving import ChatService


def create_app(
    config: ApiConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    image_transport: httpx.AsyncBaseTransport | None = None,
    resolver: Resolver = system_resolver,
    cluster: Cluster | None = None,
) -> FastAPI:
    """`transport` (to the controller), `image_transport` and `resolver` (remote images)
    are injectable for tests. `cluster`: what serves the generations (default: the controller at
    `config.controller_address`; Ray Serve's ingress passes its deployment handles)."""
    if cluster is None:
        cluster = ClusterClient(
            config.controller_address,
            config.controller_api_key,
            stream_timeout=config.upstream_timeout,
            transport=transport,
        )
    images = ImageFetcher(config.image_policy(), resolver, image_transport)
    app = FastAPI(title="llava-serve OpenAI-compatible API", lifespan=_lifespan)
    chat, completions = ChatService(config, cluster, images), CompletionService(config, cluster, images)
    app.state.api = ApiState(config, cluster, images, chat, completions)
    app.include_router(router)
    add_body_limit(app, config.body_limit, render=_too_large)
    add_bearer_auth(app, config.api_keys, render=_auth_error)
    add_disconnect_handler(app)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    api: ApiState = app.state.api
    await api.cluster.aclose()
    await api.images.aclose()


def error_response(err: ServeError) -> Response:
    """The one place an error becomes HTTP: OpenAI's error body with the matching status."""
    status, body = openai_error(err)
    headers = {"retry-after": f"{err.retry_after:g}"} if isinstance(err, Overloaded) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _auth_error(err: Unauthorized) -> tuple[int, dict[str, object]]:
    return openai_error(err)


def _too_large(err: RequestTooLarge) -> tuple[int, dict[str, object]]:
    return openai_error(err)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 400 "error parsing the body" (an over-limit body without Content-Length, JSON nested
    too deeply) as the error it hides; every other HTTP error (404, 405) in OpenAI's shape too."""
    assert isinstance(exc, HTTPException)
    err = body_error(exc)
    if err is None:
        err = RouteError(_http_message(request, exc), exc.status_code)
    response = error_response(err)
    response.headers.update(exc.headers or {})  # 405's Allow
    return response


def _http_message(request: Request, exc: HTTPException) -> str:
    if exc.status_code == 404:
        offered = "/v1/models, /v1/chat/completions and /v1/completions"
        return f"no route {request.method} {request.url.path}; this server offers {offered}"
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}"
    return str(exc.detail)


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _param_path([p for p in first["loc"] if p != "body"])
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return error_response(InvalidRequest(message, param=param or None))


def _param_path(loc: list[object]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content' (OpenAI's `param` style)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
