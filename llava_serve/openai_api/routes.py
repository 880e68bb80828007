"""HTTP only: OpenAI routes, delegating to the serving layer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from llava_serve.cluster.client import Cluster
from llava_serve.common.disconnect import ClientDisconnected, cancel_on_disconnect
from llava_serve.common.streaming import ClosingStreamingResponse
from llava_serve.errors import UnknownModel
from llava_serve.openai_api.completions import CompletionService
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.images import ImageFetcher
from llava_serve.openai_api.serving import ChatService
from llava_serve.protocol.openai import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList


@dataclass
class ApiState:
    config: ApiConfig
    cluster: Cluster
    images: ImageFetcher
    chat: ChatService
    completions: CompletionService


async def get_state(request: Request) -> ApiState:
    return request.app.state.api


router = APIRouter()


@router.get("/v1/models")
async def list_models(api: ApiState = Depends(get_state)) -> ModelList:
    return ModelList(data=[ModelCard(id=name) for name in await api.cluster.list_models()])


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, api: ApiState = Depends(get_state)) -> ModelCard:
    models = await api.cluster.list_models()
    if model not in models:
        raise UnknownModel(f"model {model!r} does not exist; available models: {models}", param="model")
    return ModelCard(id=model)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, api: ApiState = Depends(get_state)) -> Response:
    if not req.stream:
        try:
            completion = await cancel_on_disconnect(request, api.completions.complete(req))
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(completion.model_dump())
    stream = await api.completions.open_stream(req)
    return _sse(stream.sse(), stream.aclose)


@router.post("/v1/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest, request: Request, api: ApiState = Depends(get_state)
) -> Response:
    if not req.stream:
        try:
            completion = await cancel_on_disconnect(request, api.chat.complete(req))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; the generations were stopped
        return JSONResponse(completion.model_dump())
    stream = await api.chat.open_stream(req)
    return _sse(stream.sse(), stream.aclose)


def _sse(events: AsyncIterator[str], close: Callable[[], Awaitable[None]]) -> Response:
    return ClosingStreamingResponse(
        events,
        on_close=close,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
