"""The Ray Serve app on a two-node local Ray cluster (Ray's cluster_utils: two raylets on this
machine, each with one CPU and one `llava_replica` slot, so two replicas land on different nodes),
serving the tiny test model. One cluster for the module; the tests run in order:

routes (OpenAI SDK, LLaVA's stream route, errors) -> both replicas serve 8 clients -> a client that
leaves frees its slot -> over capacity is 429 + Retry-After -> a replica killed mid-load (by its pid)
-> autoscaling: idle down to 1 replica, load up to 2, idle down again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llava_serve.cluster.client import ClusterClient
from llava_serve.errors import ErrorCode
from llava_serve.protocol.frames import Frame, iter_frames
from llava_serve.protocol.worker import ChatPart, ChatRequest, ChatTurn
from tests.procs import REPO_ROOT, free_port
from tests.ray.conftest import require_ray

ray = require_ray()
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from llava_serve.ray import app as build  # noqa: E402
from llava_serve.ray.app import deployment_name  # noqa: E402

APP = "llava"
PICTURE = base64.b64encode((REPO_ROOT / "examples" / "red_circle.png").read_bytes()).decode()
# Per replica: a batch of 2, 4 ongoing (2 wait in the engine); then 16 queued in Serve: 24 in all. (Serve
# counts a request as queued until a replica took it, so a burst fills the queue for a moment even
# while replicas have room: the queue must hold a burst.)
MODEL = {
    "limit_model_concurrency": 2,
    "max_ongoing_requests": 4,
    "max_queued_requests": 16,
    "target_ongoing_requests": 2,
    "num_cpus": 1,
    "resources": {"llava_replica": 1},
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 1.0,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1.5,
    "graceful_shutdown_timeout_s": 5,
    "health_check_period_s": 2,
}
LONG = 600  # new tokens of a "long" request: seconds on this CPU under load, of a context of 1024


def app_args(model_path: Path, **scaling: Any) -> dict[str, Any]:
    return {"models": [{"model_path": str(model_path), **MODEL, **scaling}], "api": {"upstream_timeout": 30}}


@dataclass
class Deployed:
    url: str
    model: str
    model_path: Path

    def handle(self) -> Any:
        return serve.get_deployment_handle(deployment_name(self.model), APP)

    def replicas(self, calls: int = 40) -> dict[int, dict[str, Any]]:
        """pid -> info of the replicas Serve routes to (calls spread over all of them)."""
        handle = self.handle()
        infos = [handle.info.remote().result(timeout_s=30) for _ in range(calls)]
        return {i["pid"]: i for i in infos}

    def running(self) -> int:
        deployments = serve.status().applications[APP].deployments
        return deployments[deployment_name(self.model)].replica_states.get("RUNNING", 0)

    def wait_running(self, n: int, timeout: float) -> float:
        start = time.monotonic()
        wait_until(lambda: self.running() == n, timeout, f"{n} running replicas")
        return time.monotonic() - start


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def deployed(tiny_llava: Path) -> Deployed:
    # Ray's workers import llava_serve from this checkout, whatever the venv has installed.
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), old_path]))
    head = {"num_cpus": 1, "resources": {"llava_replica": 1}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        cluster.add_node(num_cpus=1, resources={"llava_replica": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build(app_args(tiny_llava, min_replicas=2, max_replicas=2)), name=APP, route_prefix="/")
        yield Deployed(f"http://127.0.0.1:{port}", tiny_llava.name, tiny_llava)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def prompt(tokens: int, image: bool = False) -> dict[str, Any]:
    text = "USER: <image>\nWhat colour is the circle? ASSISTANT:" if image else "USER: Say something. ASSISTANT:"
    body = {"prompt": text, "temperature": 0, "max_new_tokens": tokens, "ignore_eos": True}
    return body | ({"images": [PICTURE]} if image else {})


async def stream(
    client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Queue[str] | None = None
) -> list[Frame]:
    """LLaVA's stream route as its clients read it: the frames (a non-200 answer: its one frame).
    `started` gets the id of the replica serving it, at its first frame."""
    async with client.stream("POST", "/worker_generate_stream", json=body) as response:
        frames = []
        async for frame in iter_frames(response.aiter_bytes()):
            frames.append(frame)
            if started is not None and len(frames) == 1:
                started.put_nowait(response.headers.get("x-llava-replica", "?"))
        return frames


def test_two_replicas_on_two_nodes(deployed: Deployed) -> None:
    replicas = deployed.replicas()
    assert len(replicas) == 2, replicas
    assert len({r["node_id"] for r in replicas.values()}) == 2, "both replicas are on one node"


def test_openai_sdk_and_the_llava_routes_answer(deployed: Deployed) -> None:
    client = openai.OpenAI(base_url=deployed.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [deployed.model]
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PICTURE}"}},
        {"type": "text", "text": "What colour is the circle?"},
    ]
    messages = [{"role": "user", "content": content}]
    reply = client.chat.completions.create(model=deployed.model, messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=deployed.model, messages=messages, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) and chunks[-1].choices
    # LLaVA's stream route: split on NUL, parse, check error_code, as LLaVA's demo does
    raw = httpx.post(deployed.url + "/worker_generate_stream", json=prompt(8, image=True), timeout=60)
    frames = [json.loads(part) for part in raw.content.split(b"\0") if part]
    assert raw.status_code == 200 and all(f["error_code"] == 0 for f in frames)
    assert frames[-1]["finish_reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 8
    assert raw.headers["x-llava-replica"] in {r["replica_id"] for r in deployed.replicas().values()}
    # a bad request is the worker's own 4xx frame, from the replica
    bad = httpx.post(deployed.url + "/worker_generate_stream", json=prompt(8) | {"images": [PICTURE]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error_code"] == ErrorCode.IMAGE_COUNT_MISMATCH
    # the controller's routes, as LLaVA's demo calls them: the ingress stands for controller and worker
    assert httpx.post(deployed.url + "/list_models").json() == {"models": [deployed.model]}
    address = httpx.post(deployed.url + "/get_worker_address", json={"model": deployed.model}).json()["address"]
    assert address == deployed.url

    # the web demo's client (ClusterClient) pointed at the ingress as at a controller
    async def through_cluster_client() -> Frame:
        cluster = ClusterClient(deployed.url)
        try:
            assert await cluster.list_models() == [deployed.model]
            turn = ChatTurn(role="user", content=[ChatPart(type="image"), ChatPart(type="text", text="Colour?")])
            request = ChatRequest(model=deployed.model, messages=[turn], images=[PICTURE], max_new_tokens=4)
            return [f async for f in await cluster.chat(request)][-1]
        finally:
            await cluster.aclose()

    assert asyncio.run(through_cluster_client()).finish_reason is not None
    status = httpx.post(deployed.url + "/worker_get_status").json()
    assert status["model_names"] == [deployed.model]
    assert httpx.get(deployed.url + "/ready").json()["ready"] is True


def test_both_replicas_serve_eight_clients(deployed: Deployed) -> None:
    before = {pid: r["served"] for pid, r in deployed.replicas().items()}

    async def client_loop(client: httpx.AsyncClient, i: int) -> list[list[Frame]]:
        return [await stream(client, prompt(32, image=(i + k) % 2 == 0)) for k in range(2)]

    async def load() -> list[list[Frame]]:
        async with httpx.AsyncClient(base_url=deployed.url, timeout=60) as client:
            clients = await asyncio.gather(*(client_loop(client, i) for i in range(8)))
        return [frames for requests in clients for frames in requests]

    results = asyncio.run(load())
    failed = [r[-1] for r in results if r[-1].error_code or r[-1].finish_reason is None]
    assert not failed, failed
    after = {pid: r["served"] for pid, r in deployed.replicas().items()}
    served = {pid: after[pid] - before.get(pid, 0) for pid in after}
    assert len(served) == 2 and all(n >= 2 for n in served.values()), served


def test_a_client_that_leaves_frees_its_engine_slot(deployed: Deployed) -> None:
    def idle() -> dict[int, dict[str, Any]]:  # both replicas, once neither has work (routing is even then)
        replicas = deployed.replicas(20)
        return replicas if len(replicas) == 2 and all(r["queue_length"] == 0 for r in replicas.values()) else {}

    wait_until(lambda: bool(idle()), 20, "idle replicas")
    aborted = sum(r["aborted"] for r in idle().values())

    async def leave() -> None:
        async with (
            httpx.AsyncClient(base_url=deployed.url, timeout=60) as client,
            client.stream("POST", "/worker_generate_stream", json=prompt(900)) as response,
        ):
            async for _ in response.aiter_bytes():
                break  # one chunk, then leave

    asyncio.run(leave())
    wait_until(lambda: sum(r["aborted"] for r in idle().values()) == aborted + 1, 20, "the request aborted")


def test_over_capacity_is_429_with_retry_after(deployed: Deployed) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=deployed.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/worker_generate", json=prompt(200)) for _ in range(48)))

    answers = asyncio.run(burst())
    codes = [a.status_code for a in answers]
    others = [(a.status_code, a.text[:300]) for a in answers if a.status_code != 200]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, others
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error_code"] == ErrorCode.ENGINE_OVERLOADED


def test_a_killed_replica_loses_no_whole_request_and_ends_streams_clearly(deployed: Deployed) -> None:
    pids = {r["replica_id"]: pid for pid, r in deployed.replicas().items()}
    started: asyncio.Queue[str] = asyncio.Queue()

    async def whole(client: httpx.AsyncClient, openai_route: bool) -> dict[str, Any]:
        if openai_route:
            body = {"model": deployed.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG}
            answer = await client.post("/v1/chat/completions", json=body)
        else:
            answer = await client.post("/worker_generate", json=prompt(LONG))
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def load() -> tuple[list[Any], list[list[Frame]]]:
        async with httpx.AsyncClient(base_url=deployed.url, timeout=90) as client:
            wholes = [asyncio.create_task(whole(client, i % 2 == 0)) for i in range(4)]
            streams = [asyncio.create_task(stream(client, prompt(LONG), started)) for _ in range(4)]
            victim = pids[await asyncio.wait_for(started.get(), 30)]  # a replica that serves a stream
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGKILL)
            return victim, await asyncio.wait_for(asyncio.gather(*wholes), 90), await asyncio.gather(*streams)

    victim, wholes, streams = asyncio.run(load())
    assert all(w.get("choices") or w.get("finish_reason") == "length" for w in wholes), wholes
    ended = [s[-1] for s in streams]
    died = [f for f in ended if f.error_code]
    assert all(f.error_code == 0 and f.finish_reason is not None for f in ended if not f.error_code)
    assert died, "no stream was on the killed replica"
    for frame in died:
        assert frame.error_code == ErrorCode.CONTROLLER_WORKER_TIMEOUT and "died mid-stream" in (frame.message or "")
        assert frame.finish_reason is not None
    # Serve starts a new replica in its place
    deployed.wait_running(2, 60)
    wait_until(lambda: victim not in deployed.replicas() and len(deployed.replicas()) == 2, 60, "a new replica")


def test_load_scales_replicas_up_and_idleness_down(deployed: Deployed) -> None:
    # a config update (no restart): Serve takes the deployment to min_replicas before serve.run returns
    serve.run(build(app_args(deployed.model_path, min_replicas=1, max_replicas=2)), name=APP, route_prefix="/")
    deployed.wait_running(1, 60)
    stop = False

    async def load() -> None:
        async with httpx.AsyncClient(base_url=deployed.url, timeout=90) as client:

            async def client_loop() -> None:
                while not stop:
                    frames = await stream(client, prompt(200))
                    assert frames[-1].error_code == 0, frames[-1]

            await asyncio.gather(*(client_loop() for _ in range(4)))

    async def drive() -> float:
        nonlocal stop
        task = asyncio.create_task(load())
        start = time.monotonic()
        while deployed.running() < 2:
            assert time.monotonic() - start < 90 and not task.done(), "load did not add a replica"
            await asyncio.sleep(0.3)
        stop = True
        await task
        return time.monotonic() - start

    up = asyncio.run(drive())
    down_again = deployed.wait_running(1, 60)
    print(f"autoscaling: load 1->2 replicas in {up:.1f} s, idle 2->1 in {down_again:.1f} s")
