"""The API's clients of the cluster: the controller (models, routing, generation) and workers
(prompt building, model details). Every failure comes back as a typed error."""

from __future__ import annotations

from typing import Any

import httpx

from llava_serve.common.aio import aclose_shielded
from llava_serve.common.auth import bearer_headers
from llava_serve.errors import NoWorker, UnknownModel, WorkerUnavailable
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.errors import ControllerUnavailable, error_from_response


class Upstream:
    def __init__(self, config: ApiConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.controller_address = config.controller_address.rstrip("/")
        timeout = httpx.Timeout(config.upstream_timeout, connect=5.0)
        self.controller = httpx.AsyncClient(
            base_url=self.controller_address,
            headers=bearer_headers(config.controller_api_key),
            timeout=timeout,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transport,
            trust_env=False,
        )
        self.workers = httpx.AsyncClient(
            headers=bearer_headers(config.worker_api_key),
            timeout=httpx.Timeout(60.0, connect=5.0),
            transport=transport,
            trust_env=False,
        )
        self._context_length: dict[str, int] = {}

    async def aclose(self) -> None:
        await self.controller.aclose()
        await self.workers.aclose()

    async def list_models(self) -> list[str]:
        return list((await self._controller_call("/list_models", {}))["models"])

    async def worker_for(self, model: str) -> str:
        """A worker address for `model`: UnknownModel (404) if none serves it, NoWorker (503)
        if its workers are all out of rotation."""
        address = (await self._controller_call("/get_worker_address", {"model": model}))["address"]
        if address:
            return str(address)
        models = await self.list_models()
        if model not in models:
            raise UnknownModel(f"model {model!r} does not exist; available models: {models}")
        raise NoWorker(f"no worker for model {model!r} is available right now; retry later")

    async def build_prompt(self, address: str, messages: list[dict[str, Any]]) -> str:
        answer = await self._worker_call(address, "/worker_build_prompt", {"messages": messages})
        return str(answer["prompt"])

    async def context_length(self, model: str, address: str) -> int:
        if model not in self._context_length:
            details = await self._worker_call(address, "/model_details", {"model": model})
            self._context_length[model] = int(details["context_length"])
        return self._context_length[model]

    async def open_generation(self, body: dict[str, Any]) -> httpx.Response:
        """The controller's /worker_generate_stream, open (status 200) with its body unread."""
        request = self.controller.build_request("POST", "/worker_generate_stream", json=body)
        try:
            resp = await self.controller.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._controller_down(exc) from None
        if resp.status_code != 200:
            try:
                await resp.aread()
            finally:
                await aclose_shielded(resp)
            raise error_from_response(resp.status_code, resp.content, resp.headers)
        return resp

    async def _controller_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self.controller.post(path, json=body)
        except httpx.TransportError as exc:
            raise self._controller_down(exc) from None
        return _answer(resp)

    async def _worker_call(self, address: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self.workers.post(address + path, json=body)
        except httpx.TransportError as exc:
            raise WorkerUnavailable(f"cannot reach worker {address}: {type(exc).__name__}") from None
        return _answer(resp)

    def _controller_down(self, exc: Exception) -> ControllerUnavailable:
        return ControllerUnavailable(f"cannot reach the controller at {self.controller_address}: {exc!r}")


def _answer(resp: httpx.Response) -> dict[str, Any]:
    if resp.status_code != 200:
        raise error_from_response(resp.status_code, resp.content, resp.headers)
    try:
        data = resp.json()
    except ValueError:
        raise WorkerUnavailable(f"{resp.request.url} answered with invalid JSON") from None
    if not isinstance(data, dict):
        raise WorkerUnavailable(f"{resp.request.url} answered {type(data).__name__}, not an object")
    return data
