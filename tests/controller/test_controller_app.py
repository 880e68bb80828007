"""The controller app in-process: routes, secret, API keys, proxy retry/failure, expiry.

Requests go in through httpx's ASGI transport; the controller's own calls to workers go to an
httpx.MockTransport, where `dead` workers refuse connections and `broken` ones die mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llava_serve.common.attest import ATTEST_PATH, worker_proof
from llava_serve.controller.app import create_app
from llava_serve.controller.config import ControllerConfig
from llava_serve.errors import ErrorCode

pytestmark = pytest.mark.anyio

FRAMES = [{"text": "a", "error_code": 0}, {"text": "ab", "error_code": 0, "finish_reason": "stop"}]
GOOD_BODY = b"".join(json.dumps(f).encode() + b"\0" for f in FRAMES)


class DiesMidStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield GOOD_BODY[:40]  # one whole frame and part of the next
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


class Workers:
    """What the mock workers do, by host name; records the calls they get.

    `dead` workers answer the status check that registers them (unless `dead_for_status`), then
    refuse connections; with `secret` every worker proves it holds it.
    """

    def __init__(self, secret: str | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.requests: list[httpx.Request] = []
        self.models: dict[str, str] = {}
        self.secret = secret
        self.dead_for_status = False

    def status(self, host: str) -> dict[str, Any]:
        return {"model_names": [self.models.get(host, "m")], "speed": 2, "queue_length": 1}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        self.calls.append((host, path))
        self.requests.append(request)
        checking = path in ("/worker_get_status", ATTEST_PATH)
        if host.startswith("dead") and (self.dead_for_status or not checking):
            raise httpx.ConnectError("connection refused", request=request)
        if path == ATTEST_PATH and self.secret:
            challenge = json.loads(request.content)["challenge"]
            address = f"{request.url.scheme}://{request.url.netloc.decode()}"
            return httpx.Response(
                200, json={**self.status(host), "proof": worker_proof(self.secret, challenge, address)}
            )
        if path == "/worker_get_status":
            return httpx.Response(200, json=self.status(host))
        if host.startswith("broken"):
            return httpx.Response(200, stream=DiesMidStream())
        if host.startswith("leaving"):
            return httpx.Response(503, json={"text": "shutting down", "error_code": 50008})
        if host.startswith("busy"):
            return httpx.Response(429, json={"text": "busy", "error_code": 42903}, headers={"retry-after": "2"})
        return httpx.Response(200, content=GOOD_BODY, headers={"content-type": "application/octet-stream"})


def _client(config: ControllerConfig, workers: Workers, **kwargs: Any) -> httpx.AsyncClient:
    app = create_app(config, transport=httpx.MockTransport(workers), **kwargs)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://controller")


async def _register(client: httpx.AsyncClient, name: str, model: str = "m", **headers: str) -> httpx.Response:
    body = {"worker_name": name, "worker_status": {"model_names": [model], "speed": 1, "queue_length": 0}}
    return await client.post("/register_worker", json=body, headers=headers)


async def test_registration_secret_required_on_worker_routes(caplog: pytest.LogCaptureFixture) -> None:
    async with _client(ControllerConfig(registration_secret="s3"), Workers(secret="s3")) as c:
        for headers in ({}, {"x-registration-secret": "wrong"}):
            resp = await _register(c, "http://w1:1", **headers)
            assert resp.status_code == 403
            assert resp.json()["error_code"] == ErrorCode.NO_PERMISSION
            beat = await c.post("/receive_heart_beat", json={"worker_name": "http://w1:1"}, headers=headers)
            gone = await c.post("/unregister_worker", json={"worker_name": "http://w1:1"}, headers=headers)
            assert beat.status_code == gone.status_code == 403
        assert (await c.post("/list_models")).json() == {"models": []}
        assert "missing or wrong X-Registration-Secret" in caplog.text
        ok = {"x-registration-secret": "s3"}
        assert (await _register(c, "http://w1:1", **ok)).json() == {"ok": True, "heart_beat_interval": 15.0}
        assert (await c.post("/list_models")).json() == {"models": ["m"]}
        beat = await c.post("/receive_heart_beat", json={"worker_name": "http://w1:1"}, headers=ok)
        assert beat.json() == {"exist": True}
        gone = await c.post("/unregister_worker", json={"worker_name": "http://w1:1"}, headers=ok)
        assert gone.json() == {"exist": True}
        beat = await c.post("/receive_heart_beat", json={"worker_name": "http://w1:1"}, headers=ok)
        assert beat.json() == {"exist": False}


CLIENT_ROUTES = [
    ("POST", "/refresh_all_workers"),
    ("POST", "/list_models"),
    ("POST", "/get_worker_address"),
    ("POST", "/worker_get_status"),
    ("POST", "/worker_generate_stream"),
    ("GET", "/metrics"),
]


async def test_api_key_required_on_every_client_route() -> None:
    async with _client(ControllerConfig(api_keys=("k1",)), Workers()) as c:
        for method, path in CLIENT_ROUTES:
            for headers, code in (({}, 40101), ({"authorization": "Bearer no"}, 40102)):
                resp = await c.request(method, path, json={"model": "m"}, headers=headers)
                assert (resp.status_code, resp.json()["error_code"]) == (401, code), path
            resp = await c.request(method, path, json={"model": "m"}, headers={"authorization": "Bearer k1"})
            assert resp.status_code != 401, path
        assert (await c.get("/health")).status_code == 200
        assert (await _register(c, "http://w1:1")).status_code == 200  # worker routes use the secret


async def test_list_address_status_and_validation() -> None:
    workers = Workers()
    workers.models["w2"] = "n"
    async with _client(ControllerConfig(), workers) as c:
        assert (await c.post("/get_worker_address", json={"model": "m"})).json() == {"address": ""}
        await _register(c, "http://w1:1/")
        await _register(c, "http://w2:1", model="n")
        assert (await c.post("/list_models")).json() == {"models": ["m", "n"]}
        assert (await c.post("/get_worker_address", json={"model": "n"})).json() == {"address": "http://w2:1"}
        status = (await c.post("/worker_get_status")).json()
        assert status == {"model_names": ["m", "n"], "speed": 4.0, "queue_length": 2}  # 1 + 1 reported; lookups count 0
        bad = await c.post("/register_worker", json={"worker_name": "file:///etc/passwd"})
        assert bad.status_code == 400 and bad.json()["error_code"] == 40001
        assert "worker_name" in bad.json()["text"]
        no_model = await c.post("/worker_generate_stream", json={"prompt": "x"})
        assert no_model.status_code == 400 and "'model'" in no_model.json()["text"]


async def test_register_without_status_fetches_it() -> None:
    workers = Workers()
    async with _client(ControllerConfig(), workers) as c:
        assert (await c.post("/register_worker", json={"worker_name": "http://w1:1"})).status_code == 200
        assert ("w1", "/worker_get_status") in workers.calls
        assert (await c.post("/worker_get_status")).json()["speed"] == 2.0
        workers.dead_for_status = True
        resp = await c.post("/register_worker", json={"worker_name": "http://dead1:1"})
        assert resp.status_code == 502 and resp.json()["error_code"] == ErrorCode.CONTROLLER_WORKER_TIMEOUT
        assert (await c.post("/list_models")).json() == {"models": ["m"]}


async def test_no_worker_is_one_clear_frame() -> None:
    async with _client(ControllerConfig(), Workers()) as c:
        resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
    assert resp.status_code == 503
    frames = [json.loads(f) for f in resp.content.split(b"\0") if f]  # as LLaVA's clients read it
    assert frames == [resp.json()]
    assert frames[0]["error_code"] == ErrorCode.CONTROLLER_NO_WORKER and "'m'" in frames[0]["text"]


async def test_unreachable_worker_retried_and_taken_out_of_rotation() -> None:
    workers = Workers()
    # shortest_queue counts each dispatch, so every worker is tried within the first requests
    async with _client(ControllerConfig(dispatch_method="shortest_queue"), workers) as c:
        await _register(c, "http://dead1:1")
        await _register(c, "http://leaving1:1")
        await _register(c, "http://good1:1")
        for _ in range(5):
            resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
            assert resp.status_code == 200 and resp.content == GOOD_BODY
        gen_calls = [h for h, p in workers.calls if p == "/worker_generate_stream"]
        assert gen_calls.count("dead1") == 1 and gen_calls.count("leaving1") == 1  # out at once
        metrics = (await c.get("/metrics")).text
        assert "llava_controller_workers 3.0" in metrics
        assert "llava_controller_healthy_workers 1.0" in metrics
        # dead1 comes back with a heartbeat
        await c.post("/receive_heart_beat", json={"worker_name": "http://dead1:1", "queue_length": 0})
        assert "llava_controller_healthy_workers 2.0" in (await c.get("/metrics")).text


async def test_all_workers_unreachable_bounded_tries() -> None:
    workers = Workers()
    async with _client(ControllerConfig(max_tries=2), workers) as c:
        for i in range(4):
            await _register(c, f"http://dead{i}:1")
        resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
        assert resp.status_code == 503
        assert "could be reached (tried 2" in resp.json()["text"]
        assert sum(p == "/worker_generate_stream" for _, p in workers.calls) == 2
        metrics = (await c.get("/metrics")).text
        assert 'llava_controller_proxy_errors_total{kind="connect"} 2.0' in metrics
        assert "llava_controller_retries_total 1.0" in metrics


async def test_mid_stream_death_ends_with_error_frame() -> None:
    async with _client(ControllerConfig(), Workers()) as c:
        await _register(c, "http://broken1:1")
        resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
        frames = [json.loads(f) for f in resp.content.split(b"\0") if f]
        assert frames[0] == FRAMES[0]  # the partial second frame is dropped, not garbled
        assert frames[-1]["error_code"] == ErrorCode.CONTROLLER_WORKER_TIMEOUT
        assert frames[-1]["finish_reason"] == "error" and "mid-stream" in frames[-1]["text"]
        assert (await c.post("/worker_get_status")).json()["model_names"] == []  # out of rotation
        again = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
        assert again.status_code == 503 and again.json()["error_code"] == ErrorCode.CONTROLLER_NO_WORKER


async def test_worker_refusal_passed_through() -> None:
    async with _client(ControllerConfig(), Workers()) as c:
        await _register(c, "http://busy1:1")
        resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
    assert resp.json()["error_code"] == ErrorCode.ENGINE_OVERLOADED


async def test_refresh_drops_dead_workers() -> None:
    workers = Workers()
    async with _client(ControllerConfig(), workers) as c:
        await _register(c, "http://good1:1")
        await _register(c, "http://dead1:1")
        workers.dead_for_status = True
        resp = await c.post("/refresh_all_workers")
        assert resp.json() == {"workers": 1, "removed": ["http://dead1:1"]}
        assert (await c.post("/worker_get_status")).json()["speed"] == 2.0  # re-read from the worker


async def test_expiry_loop_drops_silent_workers(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    config = ControllerConfig(heart_beat_expiration=30, expiry_check_interval=0.01)
    app = create_app(config, clock=lambda: now[0], transport=httpx.MockTransport(Workers()))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as c,
    ):
        await _register(c, "http://w1:1")
        await asyncio.sleep(0.05)
        assert (await c.post("/list_models")).json() == {"models": ["m"]}
        now[0] = 31.0
        with caplog.at_level(logging.WARNING):
            for _ in range(100):
                if not (await c.post("/list_models")).json()["models"]:
                    break
                await asyncio.sleep(0.01)
        assert (await c.post("/list_models")).json() == {"models": []}
        assert "expired" in caplog.text


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="dispatch-method"):
        ControllerConfig(dispatch_method="random")
    with pytest.raises(ValueError, match="must exceed"):
        ControllerConfig(heart_beat_expiration=10, heart_beat_interval=15)


def test_cli_flags_build_the_config() -> None:
    from llava_serve.controller.__main__ import main
    from llava_serve.controller.config import build_parser, config_from_args

    argv = ["--port", "1234", "--dispatch-method", "lottery", "--api-key", "a", "--api-key", "b",
            "--registration-secret", "s", "--heart-beat-interval", "2", "--heart-beat-expiration", "5"]  # fmt: skip
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.host, config.port, config.dispatch_method) == ("127.0.0.1", 1234, "lottery")
    assert (config.api_keys, config.registration_secret, config.heart_beat_interval) == (("a", "b"), "s", 2.0)
    for bad in (["--dispatch-method", "random"], ["--heart-beat-expiration", "1"], ["--max-tries", "0"]):
        with pytest.raises(SystemExit) as info:
            main(bad)
        assert info.value.code == 2
