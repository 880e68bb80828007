"""The ingress deployment: what Serve's HTTP proxy calls. One app that answers as the single-machine
stack does, so its clients work unchanged against it:

- the OpenAI API (`openai_api.create_app`, its `Cluster` being the model deployments' handles);
- the worker routes (`/worker_generate_stream`, `/worker_chat_stream`, `/worker_generate`,
  `/worker_get_status`, `/count_token`, ...), each sent as it came to a replica of the model, which
  answers with the worker's own app;
- the controller routes LLaVA's demo calls (`/list_models`, `/get_worker_address`, which answers
  this address, `/refresh_all_workers`), so the ingress stands for both the controller and a worker.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llava_serve.common.streaming import ClosingStreamingResponse
from llava_serve.errors import InvalidRequest, Overloaded, ServeError
from llava_serve.openai_api.app import create_app
from llava_serve.openai_api.config import ApiConfig
from llava_serve.protocol.worker import WorkerStatus
from llava_serve.ray.asgi import HttpCall
from llava_serve.ray.cluster import JSON, RayCluster
from llava_serve.ray.replica import REPLICA_HEADER
from llava_serve.ray.upstream import Upstream, relay_frames

STREAM_ROUTES = ("/worker_generate_stream", "/worker_chat_stream")
WORKER_ROUTES = (
    *STREAM_ROUTES,
    "/worker_generate",
    "/count_token",
    "/model_details",
    "/worker_build_prompt",
    "/worker_get_conv_template",
    "/worker_get_embeddings",
)
# Answer headers passed on to the client (the rest are the replica's transport's).
PASSED_HEADERS = frozenset({"content-type", "retry-after", REPLICA_HEADER})


class Ingress:
    """The ingress deployment's class (`app.build_app` makes it a Serve deployment): its app is built
    in the replica, around handles to the model deployments."""

    def __init__(self, api: ApiConfig, models: dict[str, Any], tries: int) -> None:
        self.api = api
        timeout = api.upstream_timeout
        self.cluster = RayCluster({n: Upstream(n, h, tries=tries, item_timeout=timeout) for n, h in models.items()})

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_ingress_app(self.api, self.cluster)


def create_ingress_app(api: ApiConfig, cluster: RayCluster) -> FastAPI:
    app = create_app(api, cluster=cluster)
    app.title = "llava-serve on Ray Serve"
    add_worker_routes(app, cluster)
    add_controller_routes(app, cluster)
    return app


def add_worker_routes(app: FastAPI, cluster: RayCluster) -> None:
    async def forward(request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        try:
            upstream = cluster.upstream(model_of(body) if len(cluster.upstreams) > 1 else None)
            answer = await upstream.send(HttpCall("POST", path, body, JSON), whole=path not in STREAM_ROUTES)
        except ServeError as err:
            return worker_error(err)
        headers = {k: v for k, v in answer.head.headers if k in PASSED_HEADERS}
        if answer.rest is None:
            return Response(answer.body, status_code=answer.head.status, headers=headers)
        return ClosingStreamingResponse(
            relay_frames(upstream.model, answer), on_close=answer.aclose, status_code=200, headers=headers
        )

    for path in WORKER_ROUTES:
        app.add_api_route(path, forward, methods=["POST"], include_in_schema=False)

    @app.post("/worker_get_status", include_in_schema=False)
    async def worker_get_status() -> Response:
        """One replica of each model, summed (as the controller sums its workers)."""
        try:
            statuses = await asyncio.gather(*(status_of(u) for u in cluster.upstreams.values()))
        except ServeError as err:
            return worker_error(err)
        names = sorted({n for s in statuses for n in s.model_names})
        total = WorkerStatus(
            model_names=names, speed=sum(s.speed for s in statuses), queue_length=sum(s.queue_length for s in statuses)
        )
        return JSONResponse(total.model_dump())

    @app.get("/ready", include_in_schema=False)
    async def ready() -> Response:
        """Ready when a replica of every model is (its engine stepping)."""
        calls = [u.send(HttpCall("GET", "/ready"), whole=True) for u in cluster.upstreams.values()]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        models = {
            name: not isinstance(a, BaseException) and a.head.status == 200
            for name, a in zip(cluster.upstreams, answers)
        }
        ok = all(models.values())
        return JSONResponse({"ready": ok, "models": models}, status_code=200 if ok else 503)


def add_controller_routes(app: FastAPI, cluster: RayCluster) -> None:
    @app.post("/list_models", include_in_schema=False)
    async def list_models() -> dict[str, list[str]]:
        return {"models": await cluster.list_models()}

    @app.post("/refresh_all_workers", include_in_schema=False)
    async def refresh_all_workers() -> dict[str, Any]:
        return {}  # Serve keeps the replica set current

    @app.post("/get_worker_address", include_in_schema=False)
    async def get_worker_address(request: Request) -> dict[str, str]:
        """This address: the ingress serves every model's worker routes."""
        model = model_of(await request.body())
        here = str(request.base_url).rstrip("/")
        return {"address": here if model in cluster.upstreams else ""}


async def status_of(upstream: Upstream) -> WorkerStatus:
    answer = await upstream.send(HttpCall("POST", "/worker_get_status", b"{}", JSON), whole=True)
    if answer.head.status != 200:
        raise ServeError(f"a replica of {upstream.model} answered /worker_get_status with {answer.head.status}")
    return WorkerStatus.model_validate_json(answer.body)


def model_of(body: bytes) -> str | None:
    """The `model` a worker-route request names (LLaVA's and FastChat's clients send it)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def worker_error(err: ServeError) -> Response:
    """An error as the worker routes write it: one frame as the body, Retry-After when overloaded."""
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if isinstance(err, Overloaded) else None
    return JSONResponse(err.frame().body(), status_code=err.http_status, headers=headers)
