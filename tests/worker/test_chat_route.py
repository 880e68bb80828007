"""/worker_chat_stream on a real tiny LLaVA (in-process app, real engine): the worker renders its own
template, the images are decoded once for all n choices, each choice is its own sample."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llava_serve.engine.engine import BatchEngine
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.protocol.frames import Frame, iter_frames_sync
from llava_serve.worker.app import create_app
from llava_serve.worker.config import WorkerConfig
from tests.fakes.images import png_bytes

IMAGE = base64.b64encode(png_bytes("red", (32, 32))).decode()
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


@pytest.fixture(scope="module")
def worker(tiny_llava) -> Iterator[tuple[httpx.AsyncClient, BatchEngine, Any]]:  # type: ignore[no-untyped-def]
    lm = load_model(LoadOptions(model_path=str(tiny_llava), device="cpu"))
    engine = BatchEngine(lm, max_running=4, max_waiting=8).start()
    app = create_app(WorkerConfig(no_register=True), lm, engine)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker", timeout=60)
    try:
        yield client, engine, lm
    finally:
        engine.shutdown()


def post(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> httpx.Response:
    return asyncio.run(client.post(route, json=body))


def choices(resp: httpx.Response) -> dict[int, Frame]:
    """The last frame of each choice."""
    assert resp.status_code == 200, resp.text
    last: dict[int, Frame] = {}
    for frame in iter_frames_sync([resp.content]):
        assert frame.error_code == 0, frame
        last[frame.index or 0] = frame
    return last


def chat(n: int, temperature: float, seed: int | None, max_new_tokens: int = 12) -> dict[str, Any]:
    body = {"messages": MESSAGES, "images": [IMAGE], "n": n, "temperature": temperature, "seed": seed}
    return {**body, "max_new_tokens": max_new_tokens, "ignore_eos": True}


def test_greedy_chat_equals_the_llava_route_with_the_worker_built_prompt(worker) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = worker
    (answer,) = choices(post(client, "/worker_chat_stream", chat(1, 0.0, None))).values()
    prompt = post(client, "/worker_build_prompt", {"messages": MESSAGES}).json()["prompt"]
    body = {"prompt": prompt, "images": [IMAGE], "temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    (reference,) = choices(post(client, "/worker_generate_stream", {**body, "echo": False})).values()
    assert answer.text == reference.text and answer.usage == reference.usage
    assert answer.finish_reason is not None and answer.finish_reason.value == "length"


def test_n_choices_are_distinct_samples_and_a_seed_repeats_them(worker) -> None:  # type: ignore[no-untyped-def]
    client, engine, _ = worker
    first = choices(post(client, "/worker_chat_stream", chat(4, 1.0, 7)))
    assert sorted(first) == [0, 1, 2, 3] and all(f.usage and f.usage.completion_tokens == 12 for f in first.values())
    assert len({f.text for f in first.values()}) > 1  # four samples, not one answer four times
    again = choices(post(client, "/worker_chat_stream", chat(4, 1.0, 7)))
    assert {i: f.text for i, f in again.items()} == {i: f.text for i, f in first.items()}
    assert engine.queue_length() == 0  # every slot given back


@pytest.mark.parametrize(
    ("change", "status", "code", "param"),
    [
        ({"images": []}, 400, 40004, None),
        ({"images": [IMAGE, IMAGE]}, 400, 40004, None),
        ({"max_new_tokens": 10**5}, 400, 40302, "max_tokens"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, 40001, None),
        ({"n": 0}, 400, 40001, None),
    ],
)
def test_refusals_are_frames(worker, change: dict[str, Any], status: int, code: int, param: str | None) -> None:  # type: ignore[no-untyped-def]
    client, engine, _ = worker
    resp = post(client, "/worker_chat_stream", {**chat(1, 0.0, None), **change})
    assert resp.status_code == status
    frame = Frame.model_validate(resp.json())
    assert frame.error_code == code and frame.param == param and frame.message
    assert engine.queue_length() == 0


def test_llava_routes_read_json_sent_without_its_content_type(worker) -> None:  # type: ignore[no-untyped-def]
    """LLaVA's README curl line posts JSON with curl's default form content type."""
    client, _, _ = worker
    body = '{"prompt": "USER: hi ASSISTANT:", "temperature": 0, "max_new_tokens": 4}'
    headers = {"content-type": "application/x-www-form-urlencoded"}
    resp = asyncio.run(client.post("/worker_generate_stream", content=body, headers=headers))
    assert resp.status_code == 200 and choices(resp)[0].usage is not None
    resp = asyncio.run(client.post("/worker_generate_stream", content="prompt=hi", headers=headers))
    assert resp.status_code == 400 and Frame.model_validate(resp.json()).error_code == 40001


def test_a_whitespace_stop_is_trimmed_not_a_stop_on_the_llava_route(worker) -> None:  # type: ignore[no-untyped-def]
    """LLaVA's test_message sends its template's separator (" ") as `stop`; LLaVA's worker trims it."""
    client, _, _ = worker
    body = {"prompt": "USER: hi ASSISTANT:", "temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "echo": False}
    (plain,) = choices(post(client, "/worker_generate_stream", body)).values()
    assert " " in plain.text.strip()  # a hard stop on " " would have cut this answer short
    (spaced,) = choices(post(client, "/worker_generate_stream", {**body, "stop": " "})).values()
    assert spaced.usage == plain.usage and spaced.text == plain.text.removesuffix(" ")
    assert spaced.usage is not None and spaced.usage.completion_tokens == 12  # it did not stop at a space
