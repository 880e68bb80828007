"""Run a worker: start the engine, serve, drain on SIGTERM (loading is `worker/loading.py`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn

from llava_serve.common.serve import uvicorn_config
from llava_serve.engine.base import EngineBase
from llava_serve.models.base import LoadedModel
from llava_serve.worker.app import create_app
from llava_serve.worker.config import WorkerConfig
from llava_serve.worker.registration import Registrar

log = logging.getLogger("llava_serve.worker")


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: refuse new work, leave the controller, let streams finish (grace), exit 0."""

    def __init__(self, config: uvicorn.Config, app: Any, registrar: Registrar | None, grace: float) -> None:
        super().__init__(config)
        self.app = app
        self.registrar = registrar
        self.grace = grace
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.registrar is not None and not self.should_exit:
            self.registrar.start()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_task is not None:  # second signal: stop now
            return super().handle_exit(sig, frame)
        loop = asyncio.get_event_loop()
        self._drain_task = loop.create_task(self.drain())

    async def drain(self) -> None:
        service, engine = self.app.state.service, self.app.state.engine
        service.draining = True
        log.info("draining: no new requests; %d in flight", engine.queue_length())
        if self.registrar is not None:
            await self.registrar.stop(unregister=True)
        deadline = time.monotonic() + self.grace
        while engine.queue_length() and time.monotonic() < deadline:  # noqa: ASYNC110 (polls a thread's counter)
            await asyncio.sleep(0.05)
        if engine.queue_length():  # past the grace period: end the streams with a final frame
            log.info("drain: grace period over; aborting %d requests", engine.abort_all())
        while engine.queue_length() and time.monotonic() < deadline + 5:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let final frames reach the clients
        self.should_exit = True


def serve(config: WorkerConfig, lm: LoadedModel, engine: EngineBase) -> None:
    """Serve `lm` with `engine` (from `worker.loading.build_engine`); starts the engine."""
    engine.start()
    app = create_app(config, lm, engine)
    registrar = None
    if not config.no_register:
        registrar = Registrar(
            config.controller_address,
            config.worker_address,
            app.state.service.status,
            interval=config.heart_beat_interval,
            secret=config.registration_secret,
            multimodal=lm.is_multimodal,
        )

    uv_config = uvicorn_config(app, config.host, config.port, config.log_level, config.connections)
    server = DrainingServer(uv_config, app, registrar, config.shutdown_grace)
    try:
        server.run()
    finally:
        app.state.service.close()
        engine.shutdown()
