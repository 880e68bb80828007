"""The controller as a real process with fake worker processes (killed by pid, never by name)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.procs import Proc, ProcGroup, free_port

SECRET = "reg-secret"
INTERVAL = 1.0  # heartbeat interval used by the fake workers


def controller_argv(port: int, *extra: str) -> list[str]:
    return [
        "llava_serve.controller",
        "--port", str(port),
        "--registration-secret", SECRET,
        "--heart-beat-interval", str(INTERVAL),
        "--heart-beat-expiration", "3",
        "--expiry-check-interval", "0.5",
        "--log-level", "warning",
        *extra,
    ]  # fmt: skip


def start_worker(group: ProcGroup, controller: str, *extra: str, secret: str = SECRET) -> Proc:
    port = free_port()
    argv = ["tests.fakes.fake_worker", "--port", str(port), "--controller-address", controller]
    argv += ["--registration-secret", secret, "--heart-beat-interval", str(INTERVAL), *extra]
    return group.start(argv, port)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - start


def workers_of(controller: Proc) -> float:
    return httpx.post(controller.url + "/worker_get_status").json()["speed"]


def frames_of(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    buf = b""
    for chunk in resp.iter_bytes():
        buf += chunk
        *done, buf = buf.split(b"\0")
        yield from (json.loads(f) for f in done if f)


@pytest.fixture
def group() -> Iterator[ProcGroup]:
    with ProcGroup() as g:
        yield g


def test_frames_pass_through_as_they_come_and_disconnect_reaches_worker(group: ProcGroup) -> None:
    port = free_port()
    ctrl = group.start(controller_argv(port), port)
    worker = start_worker(group, ctrl.url, "--frame-delay", "0.15", "--num-tokens", "40")
    wait_until(lambda: workers_of(ctrl) == 1)
    body = {"model": "fake", "prompt": "hi", "max_new_tokens": 40}
    arrivals = []
    with httpx.stream("POST", ctrl.url + "/worker_generate_stream", json=body, timeout=10) as resp:
        for _frame in frames_of(resp):
            arrivals.append(time.monotonic())
            if len(arrivals) == 4:
                break  # leave mid-stream: closing the response must stop the worker's generation
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) > 0.08, f"frames arrived bunched, not one by one: {gaps}"

    def worker_cancelled() -> bool:
        return httpx.get(worker.url + "/stats").json() == {"active": 0, "completed": 0, "cancelled": 1, "received": 1}

    wait_until(worker_cancelled, timeout=3)


def test_sigkill_one_of_two_workers_loses_only_its_streams(group: ProcGroup) -> None:
    port = free_port()
    ctrl = group.start(controller_argv(port), port)
    doomed = start_worker(group, ctrl.url, "--frame-delay", "0.05", "--num-tokens", "10")
    start_worker(group, ctrl.url, "--frame-delay", "0.05", "--num-tokens", "10")
    wait_until(lambda: workers_of(ctrl) == 2)
    results = asyncio.run(_hundred_requests_while_killing(ctrl.url, doomed))
    assert len(results) == 100  # every request ended (each has its own timeout: none hung)
    completed = [r for r in results if r["finish_reason"] == "stop"]
    failed = [r for r in results if r not in completed]
    for r in failed:  # only streams already running on the killed worker fail, with an error frame
        assert r["error_code"] == 50006 and r["finish_reason"] == "error"
        assert doomed.url in r["text"], r
    assert all(r["text"].endswith("tok9") and r["error_code"] == 0 for r in completed)
    assert 5 <= len(failed) <= 20, len(failed)  # those streaming on it when killed: at most one wave
    print(f"completed {len(completed)}, ended with an error frame {len(failed)}")
    healthy = httpx.get(ctrl.url + "/metrics").text
    assert "llava_controller_healthy_workers 1.0" in healthy
    # with no traffic at all, heartbeat expiry alone drops it within the 3 s expiration
    assert workers_of(ctrl) <= 2 and wait_until(lambda: workers_of(ctrl) == 1, timeout=5) < 4


async def _hundred_requests_while_killing(url: str, doomed: Proc) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(20)
    async with httpx.AsyncClient(timeout=httpx.Timeout(15.0), trust_env=False) as client:

        async def one(i: int) -> dict[str, Any]:
            async with sem:
                body = {"model": "fake", "prompt": f"req {i}", "echo": False}
                async with client.stream("POST", url + "/worker_generate_stream", json=body) as resp:
                    buf = b""
                    async for chunk in resp.aiter_bytes():
                        buf += chunk
                    frames = [json.loads(f) for f in buf.split(b"\0") if f]
                    return {"finish_reason": None, **frames[-1]}

        async def killer() -> None:
            for _ in range(500):  # polling another process: no Event to wait on
                if (await client.get(doomed.url + "/stats")).json()["active"] >= 5:
                    break
                await asyncio.sleep(0.02)
            doomed.kill(signal.SIGKILL)  # mid-stream for those, and before the rest were sent

        *results, _ = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100)), killer()), 60)
        return results


def test_controller_restart_workers_reregister_within_one_interval(group: ProcGroup) -> None:
    port = free_port()
    ctrl = group.start(controller_argv(port), port)
    start_worker(group, ctrl.url)
    start_worker(group, ctrl.url, "--register-without-status")  # controller fetches its status
    wait_until(lambda: workers_of(ctrl) == 2)
    ctrl.kill(signal.SIGKILL)
    ctrl.wait()
    ctrl2 = group.start(controller_argv(port), port)
    took = wait_until(lambda: workers_of(ctrl2) == 2, timeout=5)
    assert took <= INTERVAL + 0.5, f"workers took {took:.2f}s to re-register"
    body = {"model": "fake", "prompt": "hello", "echo": False}
    resp = httpx.post(ctrl2.url + "/worker_generate_stream", json=body)
    assert json.loads(resp.content.split(b"\0")[-2])["finish_reason"] == "stop"


def test_registration_without_secret_refused(group: ProcGroup) -> None:
    port = free_port()
    ctrl = group.start(controller_argv(port, "--api-key", "client-key"), port)
    intruder = start_worker(group, ctrl.url, secret="guess")
    time.sleep(2 * INTERVAL)
    assert "refused /register_worker" in ctrl.log()
    assert "403" in intruder.log()
    key = {"authorization": "Bearer client-key"}
    assert httpx.post(ctrl.url + "/list_models", headers=key).json() == {"models": []}
    raw = httpx.post(ctrl.url + "/register_worker", json={"worker_name": "http://127.0.0.1:9"})
    assert raw.status_code == 403 and raw.json()["error_code"] == 40103
    # a client key is not a registration secret
    raw = httpx.post(ctrl.url + "/register_worker", json={"worker_name": "http://127.0.0.1:9"}, headers=key)
    assert raw.status_code == 403
