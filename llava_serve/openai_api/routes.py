"""HTTP only: OpenAI routes, delegating to the serving layer."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from llava_serve.cluster.client import ClusterClient
from llava_serve.common.disconnect import ClientDisconnected, cancel_on_disconnect
from llava_serve.common.streaming import ClosingStreamingResponse
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.images import ImageFetcher
from llava_serve.openai_api.serving import ChatService
from llava_serve.protocol.openai import ChatCompletionRequest, ModelCard, ModelList


@dataclass
class ApiState:
    config: ApiConfig
    cluster: ClusterClient
    images: ImageFetcher
    chat: ChatService


def get_state(request: Request) -> ApiState:
    return request.app.state.api


router = APIRouter()


@router.get("/v1/models")
async def list_models(api: ApiState = Depends(get_state)) -> ModelList:
    return ModelList(data=[ModelCard(id=name) for name in await api.cluster.list_models()])


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
    return ClosingStreamingResponse(
        stream.sse(),
        on_close=stream.aclose,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
