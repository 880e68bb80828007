"""create_app(config, lm, engine): the worker's HTTP routes (SPEC section 3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from llava_serve.common.attest import ATTEST_PATH
from llava_serve.common.auth import add_bearer_auth
from llava_serve.common.disconnect import ClientDisconnected, add_disconnect_handler, cancel_on_disconnect
from llava_serve.common.json_body import add_json_body
from llava_serve.common.limits import SMALL_BODY, add_body_limit, body_error
from llava_serve.common.streaming import ClosingStreamingResponse
from llava_serve.engine.base import EngineBase
from llava_serve.errors import InvalidParameter, InvalidRequest, Overloaded, ServeError
from llava_serve.models.base import LoadedModel
from llava_serve.protocol.frames import Frame, encode_frame
from llava_serve.protocol.worker import (
    BuildPromptRequest,
    BuildPromptResponse,
    ChatRequest,
    CountTokenResponse,
    GenerateRequest,
    ModelDetails,
    WorkerStatus,
)
from llava_serve.worker.attest import add_attest_route
from llava_serve.worker.config import WorkerConfig
from llava_serve.worker.fastchat import add_fastchat_routes
from llava_serve.worker.metrics import WorkerMetrics
from llava_serve.worker.service import Accepted, WorkerService

# /worker_build_prompt takes chat messages without images: text only.
PROMPT_BODY = 16 * 1024 * 1024


def create_app(config: WorkerConfig, lm: LoadedModel, engine: EngineBase) -> FastAPI:
    app = FastAPI(title="llava-serve worker", docs_url=None, redoc_url=None)
    stats = engine.stats
    metrics = WorkerMetrics(running=lambda: stats().running, waiting=lambda: stats().waiting)
    service = WorkerService(lm, engine, config.image_limits, metrics)
    app.state.config, app.state.service, app.state.engine, app.state.metrics = (
        config,
        service,
        engine,
        metrics,
    )
    _install_error_handlers(app, metrics)
    add_disconnect_handler(app)
    small = dict.fromkeys(("/worker_get_status", "/model_details", ATTEST_PATH), SMALL_BODY)
    add_body_limit(app, config.max_body_bytes, per_path={**small, "/worker_build_prompt": PROMPT_BODY})
    add_json_body(app)  # LLaVA/FastChat clients send JSON without the header
    # The status check is open to key-less callers: the controller sends no key before it passes.
    add_bearer_auth(app, config.api_key, exempt_paths={"/health", ATTEST_PATH})
    add_attest_route(app, config.registration_secret, config.worker_address, service.status)

    @app.post("/worker_generate_stream")
    async def generate_stream(body: GenerateRequest) -> Response:
        return _stream(service, await service.accept(body))

    @app.post("/worker_chat_stream")
    async def chat_stream(body: ChatRequest) -> Response:
        return _stream(service, await service.accept_chat(body))

    @app.post("/worker_generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        if body.n > 1:
            raise InvalidParameter("n > 1 needs /worker_generate_stream (one answer here)", param="n")
        accepted = await service.accept(body)

        async def answer() -> dict[str, Any]:
            last = Frame()
            async for frame in service.frames(accepted):  # cancelled on disconnect: aborts the request
                last = frame
            return last.body()

        try:
            return JSONResponse(await cancel_on_disconnect(request, answer()))
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/worker_get_status")
    async def get_status() -> WorkerStatus:
        return service.status()

    @app.post("/count_token")
    async def count_token(request: Request) -> CountTokenResponse:
        try:
            body = GenerateRequest.model_validate({**(await _json(request)), "max_new_tokens": 0})
        except ValidationError as exc:  # the same 400 as a route that declares its body
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        return CountTokenResponse(count=await service.count_tokens(body))

    @app.post("/model_details")
    async def model_details() -> ModelDetails:
        return ModelDetails(
            context_length=lm.context_length,
            is_multimodal=lm.is_multimodal,
            model_name=lm.name,
            template=lm.template_name,
        )

    add_fastchat_routes(app, service)

    @app.post("/worker_build_prompt")
    async def build_prompt(body: BuildPromptRequest) -> BuildPromptResponse:
        return BuildPromptResponse(prompt=await service.build_prompt(body.messages))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = engine.is_ready(config.ready_stall_seconds) and not service.draining
        s = stats()
        body = {
            "ready": ok,
            "running": s.running,
            "waiting": s.waiting,
            "last_step_age": round(s.last_step_age, 3),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _stream(service: WorkerService, accepted: list[Accepted]) -> Response:
    async def body() -> AsyncIterator[bytes]:
        async for frame in service.frames(accepted):
            yield encode_frame(frame)

    async def cancel() -> None:  # however the response ends, even before its first byte
        service.abort(accepted)

    return ClosingStreamingResponse(body(), on_close=cancel, media_type="application/octet-stream")


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequest("the request body is JSON nested too deeply to parse") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _install_error_handlers(app: FastAPI, metrics: WorkerMetrics) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        metrics.rejected(type(exc).__name__)
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Overloaded) else None
        return JSONResponse(exc.frame().body(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected("validation")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', [])[1:]) or 'body'}: {err.get('msg')}" for err in exc.errors()
        )
        return JSONResponse(InvalidRequest(f"invalid request: {problems}").frame().body(), 400)

    @app.exception_handler(HTTPException)
    async def unreadable_body(request: Request, exc: HTTPException) -> Response:
        err = body_error(exc)  # FastAPI's 400 "error parsing the body": say what, in the worker's shape
        return await serve_error(request, err) if err is not None else await http_exception_handler(request, exc)
