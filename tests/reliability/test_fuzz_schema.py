"""Schemathesis against the OpenAPI schema of the worker, the controller and the API, in-process.

The three apps are wired together in memory: the worker runs the tiny random LLaVA on its real
engine, the controller reaches it (and nothing else: any other address is refused) and the API
reaches both, so schema-valid requests go all the way to generation. Every operation gets positive
(schema-valid) and negative (schema-violating) cases; nothing may answer 5xx or raise, and each
service answers a known request the same way after the fuzzing as before it.

Cases per service: FUZZ_CASES (default 150 in CI; RELIABILITY_FULL=1: 1,000). To keep a case short,
generation lengths are clamped to 4 tokens and n to 2; everything else is as generated.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

from llava_serve.controller.app import create_app as controller_app
from llava_serve.controller.config import ControllerConfig
from llava_serve.engine.engine import BatchEngine
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.openai_api.app import create_app as api_app
from llava_serve.openai_api.config import ApiConfig
from llava_serve.protocol.worker import WorkerStatus
from llava_serve.worker.app import create_app as worker_app
from llava_serve.worker.config import WorkerConfig
from tests.reliability.clients import chat_body, worker_body
from tests.reliability.helpers import FULL, record

CASES = int(os.environ.get("FUZZ_CASES", 1000 if FULL else 150))
WORKER, CONTROLLER = "http://worker", "http://controller"


class Hosts(httpx.AsyncBaseTransport):
    """Outbound HTTP of an in-process app: these hosts go to these ASGI apps, any other is refused."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.transports = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.transports.get(f"{request.url.scheme}://{request.url.host}")
        if transport is None:
            raise httpx.ConnectError(f"{request.url.host} is not part of this test", request=request)
        return await transport.handle_async_request(request)


@dataclass
class Apps:
    worker: Any
    controller: Any
    api: Any
    engine: BatchEngine


@pytest.fixture(scope="module")
def lm(tiny_llava) -> Any:  # type: ignore[no-untyped-def]
    return load_model(LoadOptions(model_path=str(tiny_llava), device="cpu", model_name="tiny-llava"))


@pytest.fixture
def apps(lm: Any) -> Iterator[Apps]:
    """Fresh apps per test: the fuzzed app's lifespan ends with its run and closes its HTTP clients."""
    engine = BatchEngine(lm, max_running=4, max_waiting=16).start()
    worker = worker_app(WorkerConfig(no_register=True), lm, engine)
    controller = controller_app(ControllerConfig(), transport=Hosts({WORKER: worker}))
    status = WorkerStatus(model_names=["tiny-llava"], speed=1, queue_length=0)
    controller.state.controller.registry.register(WORKER, status, False)
    api = api_app(ApiConfig(controller_address=CONTROLLER), transport=Hosts({WORKER: worker, CONTROLLER: controller}))
    try:
        yield Apps(worker, controller, api, engine)
    finally:
        worker.state.service.close()
        engine.shutdown()


def clamp(body: Any, fields: dict[str, int]) -> None:
    """Keep each case short: integer generation lengths at most `fields[name]` (added if absent)."""
    if not isinstance(body, dict):
        return
    for name, most in fields.items():
        value = body.get(name, most)
        if isinstance(value, int) and not isinstance(value, bool):
            body[name] = max(min(value, most), -1) if value < 0 else min(value, most)


def fuzz(app: Any, budget: int, prepare: Callable[[Any], None]) -> Counter[tuple[str, str, int]]:
    """Positive and negative cases for every operation of `app`'s schema; `budget` cases in all, about.

    One in-process client (and one run of the app's lifespan) for the whole run."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    seen: Counter[tuple[str, str, int]] = Counter()
    with_input = [op for op in operations if op.body or op.query or op.path_parameters]
    # a string path parameter alone (/v1/models/{model}) has positive cases only: no schema to violate
    path_only = [op for op in with_input if not (op.body or op.query)]
    per_op = math.ceil(budget / max(1, 2 * len(with_input) - len(path_only)))
    with asgi.get_client(app) as client:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    cases(op, mode, per_op, lambda case: (prepare(case), case.call(session=client))[1], seen)()
                except Unsatisfiable:  # an operation without inputs has no negative case
                    assert mode is GenerationMode.NEGATIVE
    return seen


def cases(op: Any, mode: GenerationMode, n: int, call: Callable[[Any], Any], seen: Counter) -> Callable[[], None]:  # type: ignore[type-arg]
    """A Hypothesis test of `n` cases of `op` in `mode`: none may answer 5xx or raise."""

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        resp = call(case)
        seen[(f"{op.method.upper()} {op.path}", mode.value, resp.status_code)] += 1
        assert resp.status_code < 500 or unreachable_worker(op.path, resp), (case.body, resp.status_code, resp.text)

    return check


def unreachable_worker(path: str, resp: Any) -> bool:
    """The one 5xx that is right here: registering a worker (without its status) that does not
    answer is 502/50006 (docs/controller.md), and the fuzzed workers are unreachable by design."""
    return path == "/register_worker" and resp.status_code == 502 and resp.json().get("error_code") == 50006


def summary(seen: Counter[tuple[str, str, int]]) -> dict[str, Any]:
    by_status: Counter[int] = Counter()
    for (_, _, status), n in seen.items():
        by_status[status] += n
    return {"cases": sum(seen.values()), "by_status": dict(sorted(by_status.items())),
            "by_operation": {f"{op} {mode} {status}": n for (op, mode, status), n in sorted(seen.items())}}  # fmt: skip


async def ask(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post(path, json=body, timeout=60)


def reference(apps: Apps) -> dict[str, str]:
    """What each service answers to one known greedy request."""

    async def run() -> dict[str, str]:
        w = await ask(apps.worker, "/worker_generate", worker_body(max_new_tokens=6, echo=False))
        c = await ask(apps.controller, "/worker_generate_stream", worker_body(max_new_tokens=6, echo=False))
        a = await ask(apps.api, "/v1/chat/completions", chat_body(0, 6, stream=False))
        assert w.status_code == c.status_code == a.status_code == 200, (w.text, c.text, a.text)
        ctrl_text = [f for f in c.content.split(b"\0") if f][-1]
        return {"worker": w.json()["text"], "controller": ctrl_text.decode(),
                "api": a.json()["choices"][0]["message"]["content"]}  # fmt: skip

    return asyncio.run(run())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("service", ["worker", "controller", "api"])
def test_fuzz_from_the_openapi_schema(apps: Apps, service: str) -> None:
    before = reference(apps)
    app = getattr(apps, service)
    fields = {"max_new_tokens": 4} if service != "api" else {"max_tokens": 4, "max_completion_tokens": 4, "n": 2}

    def prepare(case: Any) -> None:
        """Short generations; and names that exist, so valid requests get past the lookup."""
        body = case.body
        clamp(body, fields)
        if not isinstance(body, dict):
            return
        if service == "api" and isinstance(body.get("model"), str):
            body["model"] = "tiny-llava"
        if service == "controller" and isinstance(body.get("worker_name"), str):
            body["worker_name"] = f"http://fuzz-{len(body['worker_name'])}:1"  # valid, unreachable

    seen = fuzz(app, CASES, prepare)
    after = reference(apps)
    assert after == before, (before, after)  # still answers, and the same
    assert apps.engine.queue_length() == 0
    found = summary(seen)
    record("fuzz", service=service, **found)
    assert found["cases"] >= CASES, found["cases"]
