"""The controller's stream proxy: pick a worker, open its stream (retrying on another worker
while none has answered), then pass frames through one by one as they arrive."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx

from llava_serve.common.aio import aclose_shielded
from llava_serve.controller.dispatch import Dispatcher
from llava_serve.controller.metrics import ControllerMetrics
from llava_serve.controller.registry import WorkerInfo
from llava_serve.errors import ErrorCode, NoWorker, ServeError, UnknownModel, WorkerUnavailable
from llava_serve.protocol.frames import FinishReason, decode_frame, encode_frame, iter_raw_frames
from llava_serve.protocol.worker import WorkerStatus

logger = logging.getLogger(__name__)

# A worker answering with these is going away: the request goes to another worker.
_GOING_AWAY = {int(ErrorCode.WORKER_SHUTTING_DOWN), int(ErrorCode.ENGINE_DEAD)}


class StreamProxy:
    def __init__(
        self, dispatcher: Dispatcher, client: httpx.AsyncClient, metrics: ControllerMetrics, max_tries: int
    ) -> None:
        self.dispatcher = dispatcher
        self.registry = dispatcher.registry
        self.client = client
        self.metrics = metrics
        self.max_tries = max_tries

    async def open(self, model: str, route: str, body: bytes) -> tuple[WorkerInfo, httpx.Response]:
        """Send the request to `route` of a worker for `model`; the response is open, its body unread."""
        tried: list[str] = []
        last_error = ""
        for _ in range(self.max_tries):
            worker = self.dispatcher.choose(model, exclude=tried)
            if worker is None:
                break
            if tried:
                self.metrics.retries.inc()
            tried.append(worker.name)
            self.metrics.dispatches.labels(model).inc()
            try:
                resp = await self._send(worker, route, body)
            except httpx.TransportError as exc:
                last_error = self.failed(worker, "connect", exc)
                continue
            if resp.status_code == 503 and await _going_away(resp):
                last_error = self.failed(worker, "going_away", f"HTTP 503 {resp.text[:200]}")
                continue
            return worker, resp
        self.metrics.no_worker.inc()
        raise self._no_worker(model, tried, last_error)

    async def relay(self, worker: WorkerInfo, upstream: httpx.Response) -> AsyncIterator[bytes]:
        """Whole frames as they arrive; a final error frame if the worker fails mid-stream.

        Closing this generator (the client went away) closes the upstream response, which the
        worker sees as a disconnect.
        """
        try:
            async for frame in iter_raw_frames(upstream.aiter_bytes()):
                yield frame
        except httpx.HTTPError as exc:  # transport failures, undecodable bodies
            reason = self.failed(worker, "midstream", exc)
            err = WorkerUnavailable(f"worker {worker.name} failed mid-stream: {reason}")
            yield encode_frame(err.frame(finish_reason=FinishReason.ERROR))
        finally:
            await aclose_shielded(upstream)

    def failed(self, worker: WorkerInfo, kind: str, error: object) -> str:
        """Take `worker` out of rotation until its next heartbeat; returns the reason."""
        reason = f"{type(error).__name__}: {error}" if isinstance(error, Exception) else str(error)
        self.registry.mark_unhealthy(worker.name)
        self.metrics.proxy_errors.labels(kind).inc()
        logger.warning("worker %s out of rotation (%s): %s", worker.name, kind, reason)
        return reason

    async def _send(self, worker: WorkerInfo, route: str, body: bytes) -> httpx.Response:
        request = self.client.build_request(
            "POST",
            worker.name + route,
            content=body,
            headers={"content-type": "application/json"},
        )
        return await self.client.send(request, stream=True)

    def _no_worker(self, model: str, tried: list[str], last_error: str) -> ServeError:
        """503 (retry) while the model has workers or may soon again; 404 for a model nobody serves."""
        if tried:
            return NoWorker(f"no worker for model {model!r} could be reached (tried {len(tried)}; last: {last_error})")
        available = self.registry.model_names()
        if model in available:
            return NoWorker(f"every worker of model {model!r} is out of rotation right now; retry shortly")
        if self.registry.warming_up():
            return NoWorker(f"no worker of model {model!r} has registered since the controller started; retry shortly")
        return UnknownModel(f"model {model!r} does not exist; available models: {available}")


async def _going_away(resp: httpx.Response) -> bool:
    try:
        await resp.aread()
    finally:
        await aclose_shielded(resp)
    try:
        return decode_frame(resp.content).error_code in _GOING_AWAY
    except ValueError:
        return False


async def fetch_worker_status(client: httpx.AsyncClient, address: str) -> WorkerStatus:
    """A worker's own /worker_get_status (raises httpx.HTTPError or ValueError on failure)."""
    resp = await client.post(address + "/worker_get_status")
    resp.raise_for_status()
    return WorkerStatus.model_validate(resp.json())
