"""ClusterClient: the client side of the cluster, for the OpenAI API, the web demo and the tools.

One set of route names, one set of auth headers (the controller's key: requests go through the
controller, never to a worker's address) and one rule for how an upstream failure reads: a typed
`ServeError` built from the FastChat-style code of the answer or frame, `ControllerUnavailable`
(503, retryable) when the controller cannot be reached or a stream is lost half-way.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
from pydantic import BaseModel

from llava_serve.common.aio import aclose_shielded
from llava_serve.common.auth import bearer_headers
from llava_serve.common.http1 import Http1Transport
from llava_serve.errors import (
    ControllerUnavailable,
    ServeError,
    WorkerUnavailable,
    error_from_frame,
)
from llava_serve.protocol.controller import ListModelsResponse
from llava_serve.protocol.frames import Frame, decode_frame, iter_frames, iter_frames_sync
from llava_serve.protocol.worker import ChatRequest, GenerateRequest

CHAT_STREAM = "/worker_chat_stream"
GENERATE_STREAM = "/worker_generate_stream"


class FrameSource(Protocol):
    """An open generation as its clients read it: frames (an error frame raised as its typed error),
    and `aclose()`, which stops the generation."""

    def __aiter__(self) -> AsyncIterator[Frame]: ...

    async def aclose(self) -> None: ...


class Cluster(Protocol):
    """What the OpenAI API needs of the serving cluster. `ClusterClient` (the controller, over HTTP)
    is one; `llava_serve.ray.cluster.RayCluster` (Ray Serve deployment handles) is the other.

    `whole=True` says the caller reads the stream to its end before answering anyone (a
    non-streaming completion): a backend may then run the generation again elsewhere if the
    replica serving it dies half-way, since nobody has seen a byte of it.
    """

    async def list_models(self) -> list[str]: ...

    async def chat(self, request: ChatRequest, *, whole: bool = False) -> FrameSource: ...

    async def generate(self, request: GenerateRequest, model: str, *, whole: bool = False) -> FrameSource: ...

    async def aclose(self) -> None: ...


class FrameStream:
    """An open generation: its frames as they come. An error frame is raised as its typed error;
    closing the stream (or leaving the loop) closes the connection, which stops the generation."""

    def __init__(self, response: httpx.Response, controller: str) -> None:
        self.response = response
        self.controller = controller

    async def __aiter__(self) -> AsyncIterator[Frame]:
        try:
            async for frame in iter_frames(self.response.aiter_bytes()):
                if frame.error_code:
                    raise error_from_frame(frame)
                yield frame
        except httpx.HTTPError as exc:
            raise ControllerUnavailable(
                f"lost the generation stream from the controller at {self.controller}: {describe(exc)}"
            ) from None
        except ValueError as exc:  # a frame that is not one
            raise WorkerUnavailable(f"invalid frame in the generation stream: {exc}") from None
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await aclose_shielded(self.response)


class ClusterClient:
    def __init__(
        self,
        controller_address: str,
        api_key: str | None = None,
        *,
        timeout: float = 20.0,
        stream_timeout: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.controller = controller_address.rstrip("/")
        self.stream_timeout = httpx.Timeout(stream_timeout, connect=min(timeout, 5.0))
        self.http = httpx.AsyncClient(
            base_url=self.controller,
            headers=bearer_headers(api_key),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport or Http1Transport(),  # the serving path's hop: see common/http1
            trust_env=False,  # the controller is reached directly, never through a proxy from the environment
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def list_models(self) -> list[str]:
        return ListModelsResponse.model_validate(await self._call("/list_models", {})).models

    async def chat(self, request: ChatRequest, *, whole: bool = False) -> FrameStream:
        """Open a chat generation: one dispatch, the worker renders its own template. (`whole` changes
        nothing here: the controller retries a worker that fails before its first byte, no later.)"""
        return await self.open_stream(CHAT_STREAM, request.model_dump(exclude_unset=True))

    async def generate(self, request: GenerateRequest, model: str, *, whole: bool = False) -> FrameStream:
        """Open a generation from a prompt built by the caller (LLaVA's protocol)."""
        return await self.open_stream(GENERATE_STREAM, {**request.model_dump(exclude_none=True), "model": model})

    async def open_stream(self, route: str, body: dict[str, Any]) -> FrameStream:
        """POST `route` to the controller; returns the open stream (status 200) or raises."""
        request = self.http.build_request("POST", route, json=body, timeout=self.stream_timeout)
        try:
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._unreachable(route, exc) from None
        if response.status_code != 200:
            try:
                await response.aread()
            finally:
                await aclose_shielded(response)
            raise error_from_response(response.status_code, response.content, response.headers)
        return FrameStream(response, self.controller)

    async def _call(self, route: str, body: BaseModel | dict[str, Any]) -> dict[str, Any]:
        payload = body.model_dump() if isinstance(body, BaseModel) else body
        try:
            response = await self.http.post(route, json=payload)
        except httpx.HTTPError as exc:
            raise self._unreachable(route, exc) from None
        if response.status_code != 200:
            raise error_from_response(response.status_code, response.content, response.headers)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise WorkerUnavailable(f"the controller answered {route} with {response.text[:200]!r}, not a JSON object")
        return data

    def _unreachable(self, route: str, exc: httpx.HTTPError) -> ControllerUnavailable:
        return ControllerUnavailable(f"cannot reach the controller at {self.controller}{route}: {describe(exc)}")


def chat_sync(address: str, request: ChatRequest, *, api_key: str | None = None, timeout: float = 120.0) -> Frame:
    """One chat generation, collected, for tools that run in threads (eval): the last frame, or the
    typed error. `address` is a controller's or a worker's (they serve the same route)."""
    with (
        httpx.Client(base_url=address.rstrip("/"), headers=bearer_headers(api_key), timeout=timeout) as http,
        http.stream("POST", CHAT_STREAM, json=request.model_dump(exclude_unset=True)) as response,
    ):
        if response.status_code != 200:
            raise error_from_response(response.status_code, response.read(), response.headers)
        last = Frame()
        for frame in iter_frames_sync(response.iter_bytes()):
            if frame.error_code:
                raise error_from_frame(frame)
            last = frame
        return last


def error_from_response(status: int, body: bytes, headers: Any) -> ServeError:
    """A non-200 answer of the controller (its body a frame) as a typed error."""
    try:
        frame = decode_frame(body)
    except ValueError:
        frame = None
    if frame is None or not frame.error_code:  # not one of ours: a gateway or proxy in between
        text = body[:200].decode("utf-8", errors="replace")
        return WorkerUnavailable(f"the controller answered HTTP {status}: {text}")
    return error_from_frame(frame, status=status, retry_after=_float(headers.get("retry-after"), 1.0))


def describe(exc: BaseException) -> str:
    """The most specific cause in words: "Connection refused", not "All connection attempts failed"."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default
