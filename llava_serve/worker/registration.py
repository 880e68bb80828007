"""Registration with the controller and heartbeats, from one async task with timeouts.

Start order does not matter: registration retries with backoff until the controller answers. A
heartbeat answered with `exist: false` (the controller restarted or expired us) re-registers at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
from pydantic import BaseModel

from llava_serve.protocol.controller import HeartBeatRequest, RegisterWorkerRequest, UnregisterWorkerRequest
from llava_serve.protocol.worker import WorkerStatus

log = logging.getLogger(__name__)


class Registrar:
    def __init__(
        self,
        controller: str,
        worker_address: str,
        status: Callable[[], WorkerStatus],
        interval: float = 15.0,
        secret: str | None = None,
        timeout: float = 5.0,
        multimodal: bool = False,
    ) -> None:
        self.controller = controller.rstrip("/")
        self.worker_address = worker_address
        self.status = status
        self.interval = interval
        self.headers = {"X-Registration-Secret": secret} if secret else {}
        self.timeout = timeout
        self.multimodal = multimodal  # FastChat's controller lists multimodal and language models apart
        self.registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llava-serve-registrar")

    async def stop(self, unregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if unregister and self.registered.is_set():
            await self._post("/unregister_worker", UnregisterWorkerRequest(worker_name=self.worker_address))

    async def _run(self) -> None:
        backoff = 0.25
        while True:
            ok = await self._register()
            if not ok:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max(1.0, self.interval / 3))
                continue
            backoff = 0.25
            while await self._heartbeat_ok():
                pass

    async def _register(self) -> bool:
        body = RegisterWorkerRequest(
            worker_name=self.worker_address, worker_status=self.status(), multimodal=self.multimodal
        )
        answer = await self._post("/register_worker", body)
        if answer is None:
            self.registered.clear()
            return False
        log.info("registered with controller %s", self.controller)
        self.registered.set()
        return True

    async def _heartbeat_ok(self) -> bool:
        """Sleep an interval, send one heartbeat; False means register again."""
        await asyncio.sleep(self.interval)
        body = HeartBeatRequest(worker_name=self.worker_address, queue_length=self.status().queue_length)
        answer = await self._post("/receive_heart_beat", body)
        if answer is None:
            return False  # unreachable: re-register (idempotent) with backoff until it is back
        if not answer.get("exist", False):
            log.warning("controller does not know this worker; registering again")
            self.registered.clear()
            return False
        return True

    async def _post(self, path: str, body: BaseModel) -> dict[str, Any] | None:
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(self.controller + path, json=body.model_dump(), headers=self.headers)
        except httpx.HTTPError as exc:
            log.debug("controller %s%s unreachable: %s", self.controller, path, exc)
            return None
        if response.status_code >= 400:
            log.error("controller refused %s: HTTP %s %s", path, response.status_code, response.text[:200])
            return None
        try:
            data = response.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
