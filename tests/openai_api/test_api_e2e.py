"""The whole path as real processes: openai client -> API -> controller -> fake workers.

The controller needs a client key and a registration secret; the API holds its own client keys,
talks to the controller with --controller-api-key, and may fetch remote images (so the SSRF
guard is live); every URL tried below is refused before any connection is made.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fakes.images import data_url
from tests.procs import Proc, free_port, spawn, wait_ready

API_KEY, CTRL_KEY, SECRET = "sk-e2e", "ctrl-key", "reg-secret"


class Stack:
    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.api, self.ctrl = procs["api"], procs["controller"]
        self.client = openai.OpenAI(base_url=self.api.url + "/v1", api_key=API_KEY, max_retries=0, timeout=20)

    def requests_seen(self, *workers: str) -> list[dict]:  # type: ignore[type-arg]
        """Every generation request the named fake workers received (either may have served it)."""
        return [r for w in workers for r in httpx.get(self.procs[w].url + "/last_requests").json()]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ports = {name: free_port() for name in ("controller", "w1", "w2", "slow", "api")}
    ctrl_url = f"http://127.0.0.1:{ports['controller']}"
    worker = ["tests.fakes.fake_worker", "--controller-address", ctrl_url, "--registration-secret", SECRET,
              "--heart-beat-interval", "1"]  # fmt: skip
    argvs = {
        "controller": ["llava_serve.controller", "--api-key", CTRL_KEY, "--registration-secret", SECRET,
                       "--heart-beat-interval", "1", "--heart-beat-expiration", "5", "--log-level", "warning"],
        "w1": [*worker, "--model-name", "fake"],
        "w2": [*worker, "--model-name", "fake"],
        "slow": [*worker, "--model-name", "slow", "--frame-delay", "0.1", "--num-tokens", "200"],
        "api": ["llava_serve.openai_api", "--controller-address", ctrl_url, "--controller-api-key", CTRL_KEY,
                "--api-key", API_KEY, "--allow-remote-images", "--max-images-per-request", "4",
                "--log-level", "warning"],
    }  # fmt: skip
    procs = {name: spawn([*argv, "--port", str(ports[name])], ports[name]) for name, argv in argvs.items()}
    try:
        for proc in procs.values():
            wait_ready(proc, timeout=60)
        status = lambda: httpx.post(ctrl_url + "/worker_get_status", headers={"authorization": f"Bearer {CTRL_KEY}"})  # noqa: E731
        deadline = time.monotonic() + 15
        while status().json()["model_names"] != ["fake", "slow"] or status().json()["speed"] != 3:
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.1)
        yield Stack(procs)
    finally:
        for proc in reversed(procs.values()):
            proc.stop()


def image_msg(text: str, *urls: str) -> dict:  # type: ignore[type-arg]
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}  # fmt: skip


def test_chat_with_image_non_streaming_and_streaming(stack: Stack) -> None:
    msgs = [image_msg("What is this?", data_url("red"))]
    resp = stack.client.chat.completions.create(model="fake", messages=msgs, max_tokens=5)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "images=1 tok1 tok2 tok3 tok4"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    chunks = list(stack.client.chat.completions.create(model="fake", messages=msgs, stream=True))  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "images=1 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_several_images_in_one_message_and_multi_turn(stack: Stack) -> None:
    msgs = [
        {"role": "system", "content": "You compare images."},
        image_msg("First two:", data_url("red"), data_url("green")),
        {"role": "assistant", "content": "Red, then green."},
        image_msg("And this one, versus the first?", data_url("blue")),
    ]
    resp = stack.client.chat.completions.create(model="fake", messages=msgs)  # type: ignore[arg-type]
    assert resp.choices[0].message.content.startswith("images=3 ")  # type: ignore[union-attr]
    sent = [r for r in stack.requests_seen("w1", "w2") if len(r["images"]) == 3]
    assert len(sent) == 1, sent
    sent = sent[0]
    assert sent["prompt"] == (
        "SYSTEM: You compare images.\nUSER: First two: <image> <image>\nASSISTANT: Red, then green.\n"
        "USER: And this one, versus the first? <image>\nASSISTANT:"
    )
    assert sent["echo"] is False


def unknown_model_is_503_then_404(client: openai.OpenAI, msgs: list) -> None:  # type: ignore[type-arg]
    """A model nobody serves: 503 (retry) while workers may still be re-registering after the
    controller's start (1.5 heartbeat intervals, 1.5 s here), then 404 model_not_found."""
    deadline = time.monotonic() + 10
    while True:
        try:
            client.chat.completions.create(model="gpt-4", messages=msgs)
        except openai.InternalServerError as err:
            assert err.status_code == 503 and "retry" in str(err) and time.monotonic() < deadline, err
            time.sleep(0.2)
        except openai.NotFoundError as err:
            assert "model 'gpt-4' does not exist" in str(err)
            return


def test_client_errors(stack: Stack) -> None:
    msgs = [image_msg("hi", data_url())]
    bad_key = openai.OpenAI(base_url=stack.api.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="fake", messages=msgs)  # type: ignore[arg-type]
    unknown_model_is_503_then_404(stack.client, msgs)
    with pytest.raises(openai.BadRequestError, match="image is missing") as info:
        stack.client.chat.completions.create(model="fake", messages=[image_msg("hi", "")])  # type: ignore[arg-type]
    assert info.value.body["param"] == "messages[0].content[1].image_url"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        stack.client.chat.completions.create(model="fake", messages=[image_msg("hi", *[data_url()] * 5)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:{ctrl}/health", "http://[::1]:{ctrl}/health", "http://169.254.169.254/latest/meta-data/",
     "http://10.0.0.1/x.png", "http://localhost:{ctrl}/health", "http://[::ffff:127.0.0.1]:{ctrl}/health"],
)  # fmt: skip
def test_ssrf_refused(stack: Stack, url: str) -> None:
    url = url.format(ctrl=stack.ctrl.port)
    with pytest.raises(openai.BadRequestError, match="non-public address"):
        stack.client.chat.completions.create(model="fake", messages=[image_msg("hi", url)])  # type: ignore[arg-type]


def test_every_route_needs_the_key(stack: Stack) -> None:
    routes = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/docs"),
              ("GET", "/openapi.json"), ("GET", "/no/such/route")]  # fmt: skip
    for method, path in routes:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            resp = httpx.request(method, stack.api.url + path, headers=headers, json={})
            assert resp.status_code == 401, path
            assert resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(stack.api.url + "/health").status_code == 200
    # the controller behind it is guarded too: the API's key is not the controller's
    resp = httpx.post(stack.ctrl.url + "/list_models", headers={"authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 401


def test_client_disconnect_stops_the_worker(stack: Stack) -> None:
    slow = stack.procs["slow"].url + "/stats"

    def wait_for_cancelled(n: int) -> None:
        deadline = time.monotonic() + 5
        while httpx.get(slow).json() | {"received": 0} != {"active": 0, "completed": 0, "cancelled": n, "received": 0}:
            assert time.monotonic() < deadline, httpx.get(slow).json()
            time.sleep(0.05)

    stream = stack.client.chat.completions.create(model="slow", messages=[image_msg("go")], stream=True)  # type: ignore[arg-type]
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # an SSE client leaves mid-stream
    wait_for_cancelled(1)
    body = {"model": "slow", "messages": [image_msg("go")]}
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client gives up waiting
        httpx.post(stack.api.url + "/v1/chat/completions", json=body, timeout=1.0,
                   headers={"authorization": f"Bearer {API_KEY}"})  # fmt: skip
    wait_for_cancelled(2)


def _dispatches(stack: Stack, model: str) -> float:
    text = httpx.get(stack.ctrl.url + "/metrics", headers={"authorization": f"Bearer {CTRL_KEY}"}).text
    prefix = f'llava_controller_dispatches_total{{model="{model}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


@pytest.mark.parametrize("n", [1, 3])
def test_one_request_is_one_dispatch_and_one_worker_call(stack: Stack, n: int) -> None:
    received = lambda: sum(httpx.get(stack.procs[w].url + "/stats").json()["received"] for w in ("w1", "w2"))  # noqa: E731
    before_dispatches, before_calls = _dispatches(stack, "fake"), received()
    msgs = [image_msg("What is this?", data_url("red"))]
    resp = stack.client.chat.completions.create(model="fake", messages=msgs, n=n, max_tokens=3)  # type: ignore[arg-type]
    assert [c.index for c in resp.choices] == list(range(n))
    assert _dispatches(stack, "fake") - before_dispatches == 1  # the controller dispatched once, for all n
    assert received() - before_calls == 1  # one call to a worker, no prompt building or lookups beside it
    bodies = [b for b in stack.requests_seen("w1", "w2") if b.get("request_id") == resp.id]
    assert len(bodies) == 1 and len(bodies[0]["images"]) == 1  # the image was sent once for the n choices
