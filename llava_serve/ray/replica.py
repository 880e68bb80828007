"""A model replica: one model, its engine and the worker app, as a worker process has them.

Serve places, restarts and scales these; each runs `worker.loading.load_model_and_engine` (the model
loaded in a thread that exits, so the engine thread owns the only OpenMP team) and
`worker.app.create_app` (admission, frames, errors: the worker's own code). Requests come from the
ingress as `HttpCall`s and run through that app in-process (`asgi.call_app`); nothing of the
generation, admission or frame logic is written again here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from llava_serve.ray.asgi import HttpCall, HttpHead, call_app
from llava_serve.worker.config import WorkerConfig

log = logging.getLogger("llava_serve.ray")
# Each answer names the replica that gave it (Serve's replica id), for operators and tests.
REPLICA_HEADER = "x-llava-replica"


class ModelReplica:
    def __init__(self, worker: WorkerConfig) -> None:
        from ray import serve

        from llava_serve.worker.app import create_app
        from llava_serve.worker.loading import load_model_and_engine

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.config = worker
        lm, self.engine = load_model_and_engine(worker)
        self.engine.start()
        self.app = create_app(worker, lm, self.engine)
        self.model_name = lm.name
        self.served = 0
        log.info("replica of %s ready (pid %d)", lm.name, os.getpid())

    async def http(self, call: HttpCall) -> AsyncIterator[HttpHead | bytes]:
        """The worker app's answer to `call`, streamed (a generator: call with `stream=True`)."""
        self.served += 1
        async for item in call_app(self.app, call):
            if isinstance(item, HttpHead):
                item = HttpHead(item.status, (*item.headers, (REPLICA_HEADER, self.replica_id)))
            yield item

    def info(self) -> dict[str, Any]:
        """Who this replica is and what it did (tests and operators: which process, which node)."""
        import ray

        return {
            "pid": os.getpid(),
            "replica_id": self.replica_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "model": self.model_name,
            "served": self.served,
            "queue_length": self.engine.queue_length(),
            "aborted": self._count("abort"),
        }

    def _count(self, outcome: str) -> int:
        metrics = self.app.state.metrics
        return int(metrics.registry.get_sample_value("llava_worker_requests_total", {"outcome": outcome}) or 0)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine stopped stepping is replaced."""
        if not self.engine.is_ready(self.config.ready_stall_seconds):
            raise RuntimeError(f"the engine of {self.model_name} is not stepping (dead: {self.engine.dead})")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        app = getattr(self, "app", None)
        if app is not None:
            app.state.service.close()
        if engine is not None:
            engine.shutdown()
