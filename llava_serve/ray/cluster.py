"""RayCluster: the OpenAI API's `Cluster` (cluster/client.py) over Serve deployment handles.

Where `ClusterClient` posts `/worker_chat_stream` to the controller, this sends the same request to a
replica of the model's deployment (`Upstream`); the frames that come back are read with the same
codec and turned into the same typed errors, so `openai_api` serves both unchanged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from llava_serve.cluster.client import CHAT_STREAM, GENERATE_STREAM, error_from_response
from llava_serve.errors import InvalidRequest, UnknownModel, WorkerUnavailable, error_from_frame
from llava_serve.protocol.frames import Frame, iter_frames
from llava_serve.protocol.worker import ChatRequest, GenerateRequest
from llava_serve.ray.asgi import HttpCall
from llava_serve.ray.upstream import Answer, Upstream, relay_frames

JSON = (("content-type", "application/json"),)


class RayFrameStream:
    """An open generation on a replica, read as frames (an error frame raised as its typed error)."""

    def __init__(self, model: str, answer: Answer) -> None:
        self.model = model
        self.answer = answer

    async def __aiter__(self) -> AsyncIterator[Frame]:
        try:
            async for frame in iter_frames(relay_frames(self.model, self.answer)):
                if frame.error_code:
                    raise error_from_frame(frame)
                yield frame
        except ValueError as exc:  # a frame that is not one
            raise WorkerUnavailable(f"invalid frame in the generation stream: {exc}") from None
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.answer.aclose()


class RayCluster:
    def __init__(self, upstreams: dict[str, Upstream]) -> None:
        self.upstreams = upstreams

    async def list_models(self) -> list[str]:
        return sorted(self.upstreams)

    def upstream(self, model: str | None) -> Upstream:
        """The model's deployment; with one model served, a request may leave `model` out."""
        if model is None or model == "":
            if len(self.upstreams) == 1:
                return next(iter(self.upstreams.values()))
            raise InvalidRequest(f"several models are served here ({sorted(self.upstreams)}): say which in `model`")
        try:
            return self.upstreams[model]
        except KeyError:
            raise UnknownModel(
                f"model {model!r} does not exist; available models: {sorted(self.upstreams)}", param="model"
            ) from None

    async def chat(self, request: ChatRequest, *, whole: bool = False) -> RayFrameStream:
        return await self.open(request.model, CHAT_STREAM, request.model_dump(exclude_unset=True), whole)

    async def generate(self, request: GenerateRequest, model: str, *, whole: bool = False) -> RayFrameStream:
        return await self.open(model, GENERATE_STREAM, request.model_dump(exclude_none=True), whole)

    async def open(self, model: str | None, route: str, body: dict[str, Any], whole: bool) -> RayFrameStream:
        upstream = self.upstream(model)
        answer = await upstream.send(HttpCall("POST", route, json.dumps(body).encode(), JSON), whole=whole)
        if answer.head.status != 200:
            raise error_from_response(answer.head.status, answer.body, dict(answer.head.headers))
        return RayFrameStream(upstream.model, answer)

    async def aclose(self) -> None:
        pass
