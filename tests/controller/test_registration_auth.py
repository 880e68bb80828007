"""Registration attacks (issue 13, item 2), in-process: each attack, then "refused, the real worker
still served". The controller's calls to workers go to an httpx.MockTransport that records them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from llava_serve.common.attest import ATTEST_PATH, controller_mac, worker_proof
from llava_serve.controller.app import create_app
from llava_serve.controller.config import ControllerConfig
from llava_serve.errors import ErrorCode, ServeError
from llava_serve.protocol.worker import WorkerStatus
from llava_serve.worker.attest import add_attest_route
from tests.controller.test_controller_app import GOOD_BODY, Workers

pytestmark = pytest.mark.anyio

SECRET = {"x-registration-secret": "s3"}
REAL = "http://real:1"


class Rogue(Workers):
    """Real workers prove the secret; `rogue*` hosts do not have it: they claim a huge speed, and
    relay the challenge to the real worker (whose proof is bound to its own address)."""

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("rogue"):
            self.calls.append((request.url.host, request.url.path))
            self.requests.append(request)
            relayed = await super().__call__(httpx.Request("POST", REAL + ATTEST_PATH, content=request.content))
            fake = {**relayed.json(), "speed": 1e9, "queue_length": 0}
            return httpx.Response(200, json=fake) if request.url.path == ATTEST_PATH else httpx.Response(200)
        return await super().__call__(request)


def _client(config: ControllerConfig, workers: Workers, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    app = create_app(config, transport=httpx.MockTransport(workers))
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://controller")


async def _register(c: httpx.AsyncClient, name: str, headers: dict[str, str], **status: Any) -> httpx.Response:
    claimed = {"model_names": ["m"], "speed": 1e9, "queue_length": 0, **status}
    return await c.post("/register_worker", json={"worker_name": name, "worker_status": claimed}, headers=headers)


async def test_without_a_secret_only_loopback_peers_may_register() -> None:
    for peer, expected in (("203.0.113.7", 403), ("10.0.0.2", 403), ("127.0.0.1", 200), ("::1", 200)):
        async with _client(ControllerConfig(), Workers(), peer) as c:
            assert (await _register(c, REAL, {})).status_code == expected, peer
            for path in ("/receive_heart_beat", "/unregister_worker"):
                resp = await c.post(path, json={"worker_name": REAL})
                assert resp.status_code == expected, (peer, path)
            if expected == 403:
                assert "only workers on its own machine" in resp.json()["text"]


async def test_the_status_comes_from_the_address_not_from_the_request() -> None:
    async with _client(ControllerConfig(), Workers()) as c:
        assert (await _register(c, REAL, {}, model_names=["stolen-name"])).status_code == 200
        status = (await c.post("/worker_get_status")).json()
    assert status["model_names"] == ["m"] and status["speed"] == 2.0  # the worker's own, not 1e9


async def test_a_rogue_address_gets_no_key_and_no_traffic() -> None:
    workers = Rogue(secret="s3")
    config = ControllerConfig(registration_secret="s3", worker_api_key="worker-key", dispatch_method="lottery")
    async with _client(config, workers) as c:
        assert (await _register(c, REAL, SECRET)).status_code == 200
        refused = await _register(c, "http://rogue:1", SECRET)  # it relays the challenge to the real worker
        assert refused.status_code == 403 and "did not prove" in refused.json()["text"]
        for _ in range(10):
            resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
            assert resp.status_code == 200 and resp.content == GOOD_BODY
    to_rogue = [r for r in workers.requests if r.url.host == "rogue"]
    assert [r.url.path for r in to_rogue] == [ATTEST_PATH]  # the challenge, and nothing else
    assert all("authorization" not in r.headers for r in to_rogue)
    checks = [r for r in workers.requests if r.url.path == ATTEST_PATH]
    assert all("authorization" not in r.headers for r in checks)  # no key before the proof, anywhere
    generated = [r for r in workers.requests if r.url.path == "/worker_generate_stream"]
    assert len(generated) == 10 and {r.url.host for r in generated} == {"real"}
    assert all(r.headers["authorization"] == "Bearer worker-key" for r in generated)


async def test_unregister_heartbeat_and_rename_need_the_secret() -> None:
    async with _client(ControllerConfig(registration_secret="s3"), Workers(secret="s3")) as c:
        assert (await _register(c, REAL, SECRET)).status_code == 200
        for _ in range(20):  # the attack: unregister the real worker in a loop, without the secret
            assert (await c.post("/unregister_worker", json={"worker_name": REAL})).status_code == 403
        assert (await _register(c, REAL, {}, model_names=["renamed"])).status_code == 403
        for _ in range(5):
            resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
            assert resp.status_code == 200
        assert (await c.post("/list_models")).json() == {"models": ["m"]}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/receive_heart_beat", {"worker_name": REAL, "queue_length": -5}),
        ("/receive_heart_beat", {"worker_name": REAL, "queue_length": 10**12}),
    ],
)
async def test_heartbeat_values_are_bounded(path: str, body: dict[str, Any]) -> None:
    async with _client(ControllerConfig(), Workers()) as c:
        resp = await c.post(path, json=body)
    assert resp.status_code == 400 and resp.json()["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR


@pytest.mark.parametrize("bad", [{"speed": "Infinity"}, {"speed": -1}, {"speed": float("nan")}, {"queue_length": -3}])
async def test_a_worker_reporting_bad_numbers_is_not_registered(bad: dict[str, Any]) -> None:
    class Liar(Workers):
        def status(self, host: str) -> dict[str, Any]:
            return {**super().status(host), **bad}

    async with _client(ControllerConfig(dispatch_method="lottery"), Liar()) as c:
        resp = await _register(c, "http://liar:1", {})
        assert resp.status_code == 502 and "status" in resp.json()["text"]
        assert (await c.post("/list_models")).json() == {"models": []}


async def test_registrations_are_capped() -> None:
    async with _client(ControllerConfig(max_workers=3), Workers()) as c:
        for i in range(3):
            assert (await _register(c, f"http://w{i}:1", {})).status_code == 200
        full = await _register(c, "http://w9:1", {})
        assert full.status_code == 429 and full.json()["error_code"] == ErrorCode.RATE_LIMIT
        assert full.headers["retry-after"] == "30"
        assert (await _register(c, "http://w0:1", {})).status_code == 200  # a known worker re-registers
        assert (await c.get("/health")).json()["workers"] == 3


def test_the_worker_key_needs_a_registration_secret() -> None:
    with pytest.raises(ValueError, match="needs --registration-secret"):
        ControllerConfig(worker_api_key="k")


def _attest_app(secret: str | None) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(ServeError, lambda r, e: JSONResponse(e.frame().body(), e.http_status))  # type: ignore
    add_attest_route(app, secret, "http://w:1", lambda: WorkerStatus(model_names=["m"], speed=1, queue_length=0))
    return app


async def test_the_worker_answers_the_check_only_to_a_secret_holder() -> None:
    app, bare = _attest_app("s3"), _attest_app(None)
    challenge = "c" * 32
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w:1") as c:
        wrong = await c.post(ATTEST_PATH, json={"challenge": challenge, "controller_mac": "00" * 32})
        assert wrong.status_code == 403 and "model_names" not in wrong.text
        right = await c.post(
            ATTEST_PATH, json={"challenge": challenge, "controller_mac": controller_mac("s3", challenge)}
        )
        assert right.json()["proof"] == worker_proof("s3", challenge, "http://w:1")
        assert right.json()["proof"] != worker_proof("s3", challenge, "http://rogue:1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare), base_url="http://w:1") as c:
        body = {"challenge": challenge, "controller_mac": controller_mac("s3", challenge)}
        assert (await c.post(ATTEST_PATH, json=body)).status_code == 403


def test_mock_proof_matches_the_address_format() -> None:
    request = httpx.Request("POST", REAL + ATTEST_PATH, content=json.dumps({"challenge": "x"}))
    assert f"{request.url.scheme}://{request.url.netloc.decode()}" == REAL


async def test_small_routes_refuse_big_bodies_before_reading() -> None:
    async with _client(ControllerConfig(), Workers()) as c:
        padded = b'{"worker_name": "http://w1:1", "pad": "' + b"a" * 100_000 + b'"}'
        for path in ("/register_worker", "/receive_heart_beat", "/get_worker_address"):
            resp = await c.post(path, content=padded, headers={"content-type": "application/json"})
            assert resp.status_code == 413 and resp.json()["error_code"] == ErrorCode.REQUEST_TOO_LARGE, path
