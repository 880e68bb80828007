"""ControllerClient against the fake backend (a real process): answers, and every error as text."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llava_serve.errors import ErrorCode, NoWorker, ServeError
from llava_serve.web.client import ControllerClient, http_error
from tests.procs import free_port
from tests.web.conftest import Backend

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(fake_backend: Backend) -> AsyncIterator[ControllerClient]:
    c = ControllerClient(fake_backend.url, fake_backend.api_key, request_timeout=5.0, stream_timeout=5.0)
    yield c
    await c.aclose()


def _payload(model: str, red_circle: Path | None = None) -> dict[str, object]:
    images = [base64.b64encode(red_circle.read_bytes()).decode()] if red_circle else []
    prompt = "USER: <image>\nWhat colour? ASSISTANT:" if red_circle else "USER: Hi ASSISTANT:"
    return {"model": model, "prompt": prompt, "images": images, "max_new_tokens": 32, "echo": False}


async def _collect(client: ControllerClient, payload: dict[str, object]) -> list[dict[str, object]]:
    return [frame async for frame in client.generate_stream(payload)]


async def test_models_address_prompt(client: ControllerClient, fake_backend: Backend) -> None:
    assert "fake-llava" in await client.list_models()
    assert await client.worker_address("fake-llava") == fake_backend.url
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    assert await client.build_prompt(fake_backend.url, messages) == "USER: <image>\nColour? ASSISTANT:"


async def test_unknown_model_has_no_worker(client: ControllerClient) -> None:
    with pytest.raises(NoWorker, match="no worker serves model 'nope'"):
        await client.worker_address("nope")


async def test_stream_is_cumulative_and_names_the_colour(client: ControllerClient, red_circle: Path) -> None:
    frames = await _collect(client, _payload("fake-llava", red_circle))
    texts = [str(f["text"]) for f in frames]
    assert len(texts) > 3 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1].endswith("is red.") and frames[-1]["finish_reason"] == "stop"


async def test_error_frame_mid_stream(client: ControllerClient, red_circle: Path) -> None:
    with pytest.raises(ServeError) as info:
        await _collect(client, _payload("fake-broken", red_circle))
    assert info.value.code == ErrorCode.CUDA_OUT_OF_MEMORY
    assert info.value.message == "worker ran out of GPU memory while decoding"  # no duplicated code suffix


async def test_429_says_when_to_retry(client: ControllerClient) -> None:
    with pytest.raises(ServeError) as info:
        await _collect(client, _payload("fake-busy"))
    assert info.value.code == ErrorCode.ENGINE_OVERLOADED
    assert "busy (HTTP 429)" in info.value.message and "try again in 3 s" in info.value.message


async def test_4xx_body_is_passed_on(client: ControllerClient) -> None:
    payload = {**_payload("fake-llava"), "prompt": "USER: <image>\nHi ASSISTANT:"}  # no image sent
    with pytest.raises(ServeError) as info:
        await _collect(client, payload)
    assert info.value.code == ErrorCode.IMAGE_COUNT_MISMATCH
    assert "1 <image> tokens but 0 images" in info.value.message


async def test_wrong_api_key(fake_backend: Backend) -> None:
    c = ControllerClient(fake_backend.url, "wrong-key")
    try:
        with pytest.raises(ServeError) as info:
            await c.list_models()
    finally:
        await c.aclose()
    assert info.value.code == ErrorCode.INCORRECT_AUTH_KEY
    assert "HTTP 401" in info.value.message and "--controller-api-key" in info.value.message


async def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    c = ControllerClient(url)
    try:
        with pytest.raises(ServeError) as info:
            await c.list_models()
        with pytest.raises(ServeError) as stream_info:
            await _collect(c, _payload("fake-llava"))
    finally:
        await c.aclose()
    for err in (info.value, stream_info.value):
        assert err.code == ErrorCode.GRADIO_REQUEST_ERROR
        assert f"cannot connect to the controller at {url}" in err.message and "is it running?" in err.message


async def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        c = ControllerClient(f"http://127.0.0.1:{listener.getsockname()[1]}", request_timeout=0.3)
        try:
            with pytest.raises(ServeError, match=r"sent nothing for 0\.3 s"):
                await c.list_models()
        finally:
            await c.aclose()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            503,
            b'{"text": "no worker serves model \'m\' (error_code: 50005)", "error_code": 50005}\0',
            ("the controller answered HTTP 503: no worker serves model 'm'", ErrorCode.CONTROLLER_NO_WORKER),
        ),
        (
            422,
            b'{"detail": [{"msg": "field required"}]}',
            ('the controller answered HTTP 422: [{"msg": "field required"}]', ErrorCode.GRADIO_REQUEST_ERROR),
        ),
        (
            400,
            b'{"error": {"message": "bad top_p", "code": 40302}}',
            ("the controller answered HTTP 400: bad top_p", ErrorCode.PARAM_OUT_OF_RANGE),
        ),
        (
            502,
            b"<html>Bad Gateway</html>",
            ("the controller answered HTTP 502: <html>Bad Gateway</html>", ErrorCode.GRADIO_REQUEST_ERROR),
        ),
        (
            500,
            b'{"text": "boom", "error_code": 12345}',
            ("the controller answered HTTP 500: boom (remote error_code 12345)", ErrorCode.GRADIO_REQUEST_ERROR),
        ),
    ],
)
def test_http_error_bodies(status: int, body: bytes, expected: tuple[str, ErrorCode]) -> None:
    err = http_error(status, body, httpx.Headers(), "the controller")
    assert (err.message, err.code) == expected
