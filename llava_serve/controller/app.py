"""create_app(config): the controller as a FastAPI app, all state on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from llava_serve.common.auth import add_bearer_auth, bearer_headers
from llava_serve.common.disconnect import add_disconnect_handler
from llava_serve.common.http1 import Http1Transport
from llava_serve.common.json_body import add_json_body
from llava_serve.common.limits import SMALL_BODY, add_body_limit, body_error
from llava_serve.controller.config import ControllerConfig
from llava_serve.controller.dispatch import Dispatcher
from llava_serve.controller.metrics import ControllerMetrics
from llava_serve.controller.proxy import StreamProxy
from llava_serve.controller.registry import Clock, Registry
from llava_serve.controller.routes import WORKER_ROUTES, ControllerState, router, worker_router
from llava_serve.errors import InvalidRequest, Overloaded, ServeError

logger = logging.getLogger(__name__)


def create_app(
    config: ControllerConfig,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """`clock`, `rng` and `transport` (outbound HTTP to workers) are injectable for tests."""
    # every live worker heartbeats (and so re-registers) within an interval of a restart
    warmup = 1.5 * config.heart_beat_interval
    registry = Registry(config.heart_beat_expiration, clock, config.max_workers, warmup=warmup)
    dispatcher = Dispatcher(registry, config.dispatch_method, rng)
    metrics = ControllerMetrics(registry)
    client = _worker_client(config, transport)
    proxy = StreamProxy(dispatcher, client, metrics, config.max_tries)

    app = FastAPI(title="llava-serve controller", lifespan=_lifespan)
    probe = _probe_client(config, transport)
    app.state.controller = ControllerState(config, registry, dispatcher, metrics, client, proxy, probe)
    app.include_router(worker_router)
    app.include_router(router)
    small = {"/list_models", "/get_worker_address", "/worker_get_status", "/refresh_all_workers", *WORKER_ROUTES}
    add_body_limit(app, config.max_body_bytes, per_path=dict.fromkeys(small, SMALL_BODY))
    add_json_body(app)  # LLaVA/FastChat clients send JSON without the header
    add_bearer_auth(app, config.api_keys, exempt_paths={"/health", *WORKER_ROUTES})
    add_disconnect_handler(app)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _unreadable_body)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctrl: ControllerState = app.state.controller
    expiry = asyncio.create_task(_expire_workers(ctrl.registry, ctrl.config.expiry_check_interval))
    try:
        yield
    finally:
        expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry
        await ctrl.client.aclose()
        await ctrl.probe.aclose()


async def _expire_workers(registry: Registry, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        for name in registry.expire():
            logger.warning("worker %s expired: no heartbeat for %.0fs", name, registry.expiration)


def _worker_client(config: ControllerConfig, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    headers = bearer_headers(config.worker_api_key)
    timeout = httpx.Timeout(config.worker_timeout, connect=config.connect_timeout)
    # No pool limit (Http1Transport has none): a pool timeout would look like a dead worker. trust_env
    # off: workers are reached directly, never through a proxy from the environment.
    transport = transport or Http1Transport()  # the stream proxy's hop: see common/http1
    return httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport, trust_env=False)


def _probe_client(config: ControllerConfig, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    """For status checks of addresses asking to register: no credential, no redirects, short timeouts."""
    timeout = httpx.Timeout(config.connect_timeout)
    return httpx.AsyncClient(timeout=timeout, transport=transport, trust_env=False, follow_redirects=False)


def error_response(request: Request, err: ServeError) -> Response:
    """The one place a ServeError becomes HTTP: one JSON object with a FastChat code.

    No trailing NUL, so `resp.json()` clients and NUL-splitting stream clients both read it.
    """
    headers = {"retry-after": f"{err.retry_after:g}"} if isinstance(err, Overloaded) else None
    return JSONResponse(err.frame().body(), status_code=err.http_status, headers=headers)


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    return error_response(request, exc)


async def _unreadable_body(request: Request, exc: Exception) -> Response:
    """FastAPI's 400 "error parsing the body" (an over-limit body without Content-Length, JSON nested
    too deeply) as the error it hides; other HTTP errors (404, 405) as FastAPI answers them."""
    assert isinstance(exc, HTTPException)
    err = body_error(exc)
    return error_response(request, err) if err is not None else await http_exception_handler(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(request, InvalidRequest(f"invalid request: {describe_validation(exc)}"))


def describe_validation(exc: RequestValidationError) -> str:
    """'field.path: problem; ...' from pydantic's errors, without FastAPI's 'body' prefix."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"] if p != "body")
        parts.append(f"{where}: {e['msg']}" if where else str(e["msg"]))
    return "; ".join(parts)
