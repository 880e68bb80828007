"""A real worker on the bundled model and a real controller in front of it, both in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from llava_serve.controller.app import create_app as create_controller
from llava_serve.controller.config import ControllerConfig
from llava_serve.default_model import default_model_path
from llava_serve.engine.engine import BatchEngine
from llava_serve.models.base import LoadedModel
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.protocol.controller import RegisterWorkerRequest
from llava_serve.worker.app import create_app as create_worker
from llava_serve.worker.config import WorkerConfig

WORKER = "http://worker"


TEXT_WORKER = "http://text-worker"


@dataclass
class Stack:
    lm: LoadedModel
    engine: BatchEngine
    worker: httpx.AsyncClient
    controller: httpx.AsyncClient

    def post(self, client: httpx.AsyncClient, route: str, body: Any = None, **headers: str) -> httpx.Response:
        return asyncio.run(client.post(route, json=body, headers=headers))


class _Hosts:
    """The controller's outbound HTTP: our worker, plus a FastChat-style text worker at TEXT_WORKER that
    answers its status check (the controller registers what an address says about itself)."""

    def __init__(self, worker: httpx.ASGITransport) -> None:
        self.worker = worker

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == httpx.URL(TEXT_WORKER).host:
            return httpx.Response(200, json={"model_names": ["vicuna"], "speed": 1, "queue_length": 0})
        return await self.worker.handle_async_request(request)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    lm = load_model(LoadOptions(model_path=str(default_model_path()), device="cpu"))
    engine = BatchEngine(lm, max_running=4, max_waiting=8).start()
    worker_app = create_worker(WorkerConfig(no_register=True), lm, engine)
    to_worker = httpx.ASGITransport(app=worker_app)
    controller_app = create_controller(ControllerConfig(), transport=httpx.MockTransport(_Hosts(to_worker)))
    stack = Stack(
        lm,
        engine,
        httpx.AsyncClient(transport=to_worker, base_url=WORKER, timeout=60),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=controller_app), base_url="http://ctrl", timeout=60),
    )
    # what the worker's Registrar sends
    status = worker_app.state.service.status()
    registration = RegisterWorkerRequest(worker_name=WORKER, worker_status=status, multimodal=lm.is_multimodal)
    try:
        assert stack.post(stack.controller, "/register_worker", registration.model_dump()).status_code == 200
        yield stack
    finally:
        engine.shutdown()
