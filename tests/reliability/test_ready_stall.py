"""/ready goes false while the engine is stuck, and true again once it steps.

SIGSTOP freezes the whole process, /ready included, so the stuck engine is simulated in-process: the
runner's step blocks on an Event while the app is driven through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from llava_serve.engine.engine import BatchEngine
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.worker.app import create_app
from llava_serve.worker.config import WorkerConfig
from tests.reliability.clients import worker_body
from tests.reliability.helpers import record

STALL = 0.5


@pytest.fixture
def stuck_worker(tiny_llava) -> Iterator[tuple[httpx.AsyncClient, threading.Event, BatchEngine]]:
    lm = load_model(LoadOptions(model_path=str(tiny_llava), device="cpu"))
    engine = BatchEngine(lm, max_running=2, max_waiting=2)
    release, entered = threading.Event(), threading.Event()
    run = engine.runner.run

    def stuck_run(batch):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(30), "the test never released the engine"
        return run(batch)

    engine.runner.run = stuck_run  # type: ignore[method-assign]
    engine.start()
    app = create_app(WorkerConfig(no_register=True, ready_stall_seconds=STALL), lm, engine)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker", timeout=30)
    engine.entered = entered  # type: ignore[attr-defined]
    try:
        yield client, release, engine
    finally:
        release.set()
        engine.shutdown()


def test_ready_is_503_while_the_engine_is_stuck_and_200_after(stuck_worker) -> None:  # type: ignore[no-untyped-def]
    client, release, engine = stuck_worker

    async def run() -> dict[str, float]:
        assert (await client.get("/ready")).status_code == 200  # idle: ready
        job = asyncio.create_task(client.post("/worker_generate", json=worker_body(0, 4)))
        await asyncio.to_thread(engine.entered.wait, 10)  # the first step (its prefill) blocks
        t0 = time.monotonic()
        while (resp := await client.get("/ready")).status_code == 200:
            assert time.monotonic() - t0 < STALL + 2, "still ready long after the stall limit"
            await asyncio.sleep(0.05)
        went_false = time.monotonic() - t0
        body = resp.json()
        assert resp.status_code == 503 and body["ready"] is False and body["running"] == 1, body
        assert body["last_step_age"] >= STALL, body
        assert (await client.get("/health")).status_code == 200  # alive, just not ready
        status = (await client.post("/worker_get_status")).json()
        assert status["queue_length"] == 1, status
        release.set()
        answer = await asyncio.wait_for(job, 30)
        t1 = time.monotonic()
        while (await client.get("/ready")).status_code != 200:
            assert time.monotonic() - t1 < 5, "not ready again after the engine moved on"
            await asyncio.sleep(0.02)
        assert answer.status_code == 200 and answer.json()["finish_reason"] == "length", answer.text
        assert (await client.post("/worker_get_status")).json()["queue_length"] == 0
        back = time.monotonic() - t1
        return {"not_ready_after_s": round(went_false, 2), "ready_again_after_release_s": round(back, 3)}

    figures = asyncio.run(run())
    record("ready_stall", stall_limit_s=STALL, **figures)
