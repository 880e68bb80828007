"""The controller's HTTP routes (LLaVA's, with LLaVA's meaning, plus unregister/health/metrics)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from llava_serve.common.aio import aclose_shielded
from llava_serve.common.auth import secret_matches
from llava_serve.common.serve import is_loopback_host
from llava_serve.common.streaming import ClosingStreamingResponse
from llava_serve.controller.attest import verified_status
from llava_serve.controller.config import ControllerConfig
from llava_serve.controller.dispatch import Dispatcher
from llava_serve.controller.metrics import ControllerMetrics
from llava_serve.controller.proxy import StreamProxy, fetch_worker_status
from llava_serve.controller.registry import Registry
from llava_serve.errors import Forbidden, InvalidRequest
from llava_serve.protocol.controller import (
    GetWorkerAddressRequest,
    GetWorkerAddressResponse,
    HeartBeatRequest,
    HeartBeatResponse,
    ListModelsResponse,
    RegisterWorkerRequest,
    RegisterWorkerResponse,
    UnregisterWorkerRequest,
    UnregisterWorkerResponse,
)
from llava_serve.protocol.worker import WorkerStatus

logger = logging.getLogger(__name__)

# Routes workers call: guarded by the registration secret instead of client API keys.
WORKER_ROUTES = frozenset({"/register_worker", "/receive_heart_beat", "/unregister_worker"})


@dataclass
class ControllerState:
    config: ControllerConfig
    registry: Registry
    dispatcher: Dispatcher
    metrics: ControllerMetrics
    client: httpx.AsyncClient  # carries the worker key: only for workers that passed the status check
    proxy: StreamProxy
    probe: httpx.AsyncClient  # carries nothing: for the status check of an address not yet registered


async def get_state(request: Request) -> ControllerState:
    return request.app.state.controller


async def require_registration_secret(request: Request) -> None:
    """With a secret: the secret. Without one: only processes on this machine may register."""
    secret = request.app.state.controller.config.registration_secret
    host = request.client.host if request.client else "?"
    if secret and not secret_matches(request.headers.get("x-registration-secret"), secret):
        logger.warning("refused %s from %s: missing or wrong X-Registration-Secret", request.url.path, host)
        raise Forbidden("missing or wrong X-Registration-Secret header")
    if not secret and not is_loopback_host(host):
        logger.warning("refused %s from %s: no --registration-secret, loopback only", request.url.path, host)
        raise Forbidden("this controller has no registration secret: only workers on its own machine may register")


worker_router = APIRouter(dependencies=[Depends(require_registration_secret)])
router = APIRouter()


@worker_router.post("/register_worker")
async def register_worker(
    req: RegisterWorkerRequest, ctrl: ControllerState = Depends(get_state)
) -> RegisterWorkerResponse:
    # What the address says about itself, not what the request claims (req.worker_status is ignored).
    status = await verified_status(ctrl.probe, req.worker_name, ctrl.config.registration_secret)
    ctrl.registry.register(req.worker_name, status, req.check_heart_beat, req.multimodal)
    logger.info("registered worker %s: models=%s speed=%s", req.worker_name, status.model_names, status.speed)
    return RegisterWorkerResponse(heart_beat_interval=ctrl.config.heart_beat_interval)


@worker_router.post("/receive_heart_beat")
async def receive_heart_beat(req: HeartBeatRequest, ctrl: ControllerState = Depends(get_state)) -> HeartBeatResponse:
    return HeartBeatResponse(exist=ctrl.registry.heart_beat(req.worker_name, req.queue_length))


@worker_router.post("/unregister_worker")
async def unregister_worker(
    req: UnregisterWorkerRequest, ctrl: ControllerState = Depends(get_state)
) -> UnregisterWorkerResponse:
    existed = ctrl.registry.unregister(req.worker_name)
    logger.info("unregistered worker %s (known: %s)", req.worker_name, existed)
    return UnregisterWorkerResponse(exist=existed)


@router.post("/refresh_all_workers")
async def refresh_all_workers(ctrl: ControllerState = Depends(get_state)) -> dict[str, object]:
    """Re-read every worker's status; drop the ones that do not answer."""
    names = [w.name for w in ctrl.registry.workers()]
    results = await asyncio.gather(*(fetch_worker_status(ctrl.client, n) for n in names), return_exceptions=True)
    removed = []
    for name, result in zip(names, results, strict=True):
        info = ctrl.registry.get(name)
        if info is None:
            continue
        if isinstance(result, WorkerStatus):
            ctrl.registry.register(name, result, info.check_heart_beat, info.multimodal)
        else:
            ctrl.registry.unregister(name)
            removed.append(name)
            logger.warning("refresh: removed worker %s: %s", name, result)
    return {"workers": len(ctrl.registry), "removed": removed}


@router.post("/list_models")
async def list_models(ctrl: ControllerState = Depends(get_state)) -> ListModelsResponse:
    return ListModelsResponse(models=ctrl.registry.model_names())


@router.post("/list_multimodal_models")
async def list_multimodal_models(ctrl: ControllerState = Depends(get_state)) -> ListModelsResponse:
    return ListModelsResponse(models=ctrl.registry.model_names_of(multimodal=True))


@router.post("/list_language_models")
async def list_language_models(ctrl: ControllerState = Depends(get_state)) -> ListModelsResponse:
    return ListModelsResponse(models=ctrl.registry.model_names_of(multimodal=False))


@router.get("/test_connection")
async def test_connection() -> str:
    return "success"  # FastChat's answer, which its clients check


@router.post("/get_worker_address")
async def get_worker_address(
    req: GetWorkerAddressRequest, ctrl: ControllerState = Depends(get_state)
) -> GetWorkerAddressResponse:
    worker = ctrl.dispatcher.peek(req.model)  # a lookup, not a dispatch: nothing is counted
    return GetWorkerAddressResponse(address=worker.name if worker is not None else "")


@router.post("/worker_get_status")
async def worker_get_status(ctrl: ControllerState = Depends(get_state)) -> WorkerStatus:
    return ctrl.registry.aggregate_status()


@router.post("/worker_generate_stream")
async def worker_generate_stream(request: Request, ctrl: ControllerState = Depends(get_state)) -> Response:
    return await _proxied(request, ctrl, "/worker_generate_stream")


@router.post("/worker_chat_stream")
async def worker_chat_stream(request: Request, ctrl: ControllerState = Depends(get_state)) -> Response:
    """Chat messages + images, rendered by the worker that generates: one dispatch per request."""
    return await _proxied(request, ctrl, "/worker_chat_stream")


async def _proxied(request: Request, ctrl: ControllerState, route: str) -> Response:
    body = await request.body()
    worker, upstream = await ctrl.proxy.open(_model_of(body), route, body)
    if upstream.status_code != 200:  # the worker refused the request: pass its answer through
        try:
            content = await upstream.aread()
        finally:
            await aclose_shielded(upstream)
        keep = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        return Response(content, status_code=upstream.status_code, headers=keep)
    media_type = upstream.headers.get("content-type", "application/octet-stream")
    return ClosingStreamingResponse(ctrl.proxy.relay(worker, upstream), on_close=upstream.aclose, media_type=media_type)


@router.get("/health")
async def health(ctrl: ControllerState = Depends(get_state)) -> dict[str, object]:
    return {"status": "ok", "workers": len(ctrl.registry)}


@router.get("/metrics")
async def metrics(ctrl: ControllerState = Depends(get_state)) -> Response:
    return Response(ctrl.metrics.render(), media_type=ctrl.metrics.content_type)


def _model_of(body: bytes) -> str:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        raise InvalidRequest("request body must be a JSON object") from None
    except RecursionError:
        raise InvalidRequest("request body is JSON nested too deeply to parse") from None
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' (the model name) is required to route the request")
    return model
