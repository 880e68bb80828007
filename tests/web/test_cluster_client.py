"""ClusterClient against the fake backend (a real process): answers, and every error typed and readable."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llava_serve.cluster.client import ClusterClient, error_from_response
from llava_serve.errors import ControllerUnavailable, ErrorCode, Overloaded, ServeError, UnknownModel
from llava_serve.protocol.frames import FinishReason, Frame
from llava_serve.protocol.worker import ChatPart, ChatRequest, ChatTurn, GenerateRequest
from tests.procs import free_port
from tests.web.conftest import Backend

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(fake_backend: Backend) -> AsyncIterator[ClusterClient]:
    c = ClusterClient(fake_backend.url, fake_backend.api_key, timeout=5.0, stream_timeout=5.0)
    yield c
    await c.aclose()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _chat(model: str, red_circle: Path | None = None) -> ChatRequest:
    images = [_b64(red_circle)] if red_circle else []
    parts = [ChatPart(type="image")] * len(images) + [ChatPart(type="text", text="What colour?")]
    return ChatRequest(model=model, messages=[ChatTurn(role="user", content=parts)], images=images, max_new_tokens=32)


async def _collect(client: ClusterClient, request: ChatRequest) -> list[Frame]:
    return [frame async for frame in await client.chat(request)]


async def test_models_and_one_chat_call(client: ClusterClient, fake_backend: Backend, red_circle: Path) -> None:
    assert "fake-llava" in await client.list_models()
    frames = await _collect(client, _chat("fake-llava", red_circle))
    texts = [f.text for f in frames]
    assert len(texts) > 3 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1].endswith("is red.") and frames[-1].finish_reason is FinishReason.STOP
    async with httpx.AsyncClient() as http:  # the backend rendered the prompt from the messages itself
        last = (await http.get(fake_backend.url + "/last_request")).json()
    assert last["prompt"] == "USER: <image>\nWhat colour? ASSISTANT:" and len(last["images"]) == 1


async def test_llava_protocol_generate(client: ClusterClient, red_circle: Path) -> None:
    request = GenerateRequest(prompt="USER: <image>\nColour? ASSISTANT:", images=[_b64(red_circle)], echo=False)
    frames = [f async for f in await client.generate(request, "fake-llava")]
    assert frames[-1].text.endswith("is red.")


async def test_unknown_model_is_404(client: ClusterClient) -> None:
    with pytest.raises(UnknownModel, match="'nope' does not exist") as info:
        await _collect(client, _chat("nope"))
    assert info.value.http_status == 404


async def test_error_frame_mid_stream(client: ClusterClient, red_circle: Path) -> None:
    with pytest.raises(ServeError) as info:
        await _collect(client, _chat("fake-broken", red_circle))
    assert info.value.code == ErrorCode.CUDA_OUT_OF_MEMORY
    assert info.value.message == "worker ran out of GPU memory while decoding"  # the message, no code suffix


async def test_429_keeps_retry_after(client: ClusterClient) -> None:
    with pytest.raises(Overloaded) as info:
        await _collect(client, _chat("fake-busy"))
    assert info.value.retry_after == 3 and info.value.code == ErrorCode.ENGINE_OVERLOADED


async def test_4xx_frame_is_typed(client: ClusterClient) -> None:
    request = _chat("fake-llava")
    request.messages[0].content = [ChatPart(type="image"), ChatPart(type="text", text="Hi")]  # no image sent
    with pytest.raises(ServeError) as info:
        await _collect(client, request)
    assert info.value.code == ErrorCode.IMAGE_COUNT_MISMATCH
    assert "1 <image> tokens but 0 images" in info.value.message


async def test_wrong_api_key(fake_backend: Backend) -> None:
    c = ClusterClient(fake_backend.url, "wrong-key")
    try:
        with pytest.raises(ServeError) as info:
            await c.list_models()
    finally:
        await c.aclose()
    assert info.value.code == ErrorCode.INCORRECT_AUTH_KEY and info.value.http_status == 401


async def test_connection_refused_is_retryable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    c = ClusterClient(url)
    try:
        with pytest.raises(ControllerUnavailable) as info:
            await c.list_models()
        with pytest.raises(ControllerUnavailable) as stream_info:
            await _collect(c, _chat("fake-llava"))
    finally:
        await c.aclose()
    for err in (info.value, stream_info.value):
        assert err.http_status == 503
        assert f"cannot reach the controller at {url}" in err.message and "Connection refused" in err.message


async def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        c = ClusterClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
        try:
            with pytest.raises(ControllerUnavailable, match="timed out"):
                await c.list_models()
        finally:
            await c.aclose()


@pytest.mark.parametrize(
    ("status", "body", "message", "code"),
    [
        (
            503,
            b'{"text": "no worker serves model \'m\' (error_code: 50005)", "error_code": 50005}\0',
            "no worker serves model 'm' (error_code: 50005)",  # another project's frame: text is all it has
            ErrorCode.CONTROLLER_NO_WORKER,
        ),
        (503, Frame.failure(50005, "none").model_dump_json().encode(), "none", ErrorCode.CONTROLLER_NO_WORKER),
        (500, b'{"text": "boom", "error_code": 12345}', "boom", ErrorCode.INTERNAL_ERROR),
    ],
)
def test_error_bodies(status: int, body: bytes, message: str, code: ErrorCode) -> None:
    err = error_from_response(status, body, httpx.Headers())
    assert message in err.message and err.code == code and err.http_status == status


@pytest.mark.parametrize(
    ("status", "body"), [(422, b'{"detail": [{"msg": "field required"}]}'), (502, b"<html>Bad Gateway</html>")]
)
def test_answers_not_of_ours_are_a_bad_gateway(status: int, body: bytes) -> None:
    err = error_from_response(status, body, httpx.Headers())
    assert err.http_status == 502 and f"HTTP {status}: {body.decode()[:20]}" in err.message
