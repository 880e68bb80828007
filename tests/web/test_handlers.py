"""The demo's handlers without a browser: answers stream in, errors read as text, state stays sane."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llava_serve.cluster.client import ClusterClient
from llava_serve.web.config import WebConfig, cluster_client
from llava_serve.web.conversation import Conversation, encode_image
from llava_serve.web.handlers import DemoHandlers
from tests.procs import free_port
from tests.web.conftest import Backend, draw_circle


def _handlers(url: str, api_key: str | None = None, mode: str = "once") -> DemoHandlers:
    config = WebConfig(controller_url=url, controller_api_key=api_key, model_list_mode=mode)  # type: ignore[arg-type]
    return DemoHandlers(config, cluster_client(config))


@pytest.fixture
async def handlers(fake_backend: Backend) -> AsyncIterator[DemoHandlers]:
    h = _handlers(fake_backend.url, fake_backend.api_key)
    yield h
    await h.client.aclose()


async def _answer(h: DemoHandlers, conv: Conversation, model: str | None) -> list[str]:
    """The last chat message after each update."""
    return [str(msgs[-1]["content"]) async for msgs in h.answer(conv, model, 0.2, 0.7, 64)]


@pytest.mark.anyio
async def test_answer_streams_into_the_chat(handlers: DemoHandlers, red_circle: Path) -> None:
    conv = Conversation()
    conv.add_question("What colour is the circle?", str(red_circle))
    shown = await _answer(handlers, conv, "fake-llava")
    assert len(shown) > 3 and shown[-1].endswith("is red.")
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))
    assert not conv.busy and conv.turns[-1].text == shown[-1]


@pytest.mark.anyio
async def test_failed_exchange_is_shown_but_not_resent(
    handlers: DemoHandlers, red_circle: Path, tmp_path: Path
) -> None:
    conv = Conversation()
    conv.add_question("Colour?", str(red_circle))
    shown = await _answer(handlers, conv, "fake-broken")
    assert shown[-1].startswith("Looking at\n\nError: worker ran out of GPU memory")
    assert shown[-1].endswith("(error code 50002)") and conv.turns[-1].error
    assert shown[-1].count("50002") == 1  # the message travels without the code: it is shown once
    conv.add_question("And this one?", str(draw_circle(tmp_path / "blue.png", (30, 60, 220))))
    request = conv.model_request()
    assert [m["content"][-1]["text"] for m in request.messages] == ["And this one?"]
    assert (await _answer(handlers, conv, "fake-llava"))[-1].endswith("is blue.")


@pytest.mark.anyio
async def test_regenerate_replaces_the_last_answer(handlers: DemoHandlers, red_circle: Path) -> None:
    conv = Conversation()
    conv.add_question("Colour?", str(red_circle))
    await _answer(handlers, conv, "fake-busy")
    assert "the model is busy, try again in 3 s" in conv.turns[-1].text
    handlers.regenerate(conv)
    assert (await _answer(handlers, conv, "fake-llava"))[-1].endswith("is red.")
    assert [t.role for t in conv.turns] == ["user", "assistant"]


@pytest.mark.anyio
async def test_no_model_selected(handlers: DemoHandlers) -> None:
    conv = Conversation()
    conv.add_question("Hi", None)
    assert "no model is selected" in (await _answer(handlers, conv, None))[-1]


@pytest.mark.anyio
async def test_controller_down_reads_as_text() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    h = _handlers(url)
    conv = Conversation()
    conv.add_question("Hi", None)
    try:
        shown = await _answer(h, conv, "any")
        _, note = await h.load_models(None)
    finally:
        await h.client.aclose()
    assert shown == [
        f"Error: cannot reach the controller at {url}/worker_chat_stream: Connection refused "
        "(error code 50001); is the controller running?"
    ]
    assert "Could not load the model list" in note and "cannot reach the controller" in note


class CountingClient(ClusterClient):
    def __init__(self, models: list[str]) -> None:
        super().__init__("http://127.0.0.1:9")
        self.models, self.calls = models, 0

    async def list_models(self) -> list[str]:
        self.calls += 1
        return self.models


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "calls"), [("once", 1), ("reload", 3)])
async def test_model_list_mode(mode: str, calls: int) -> None:
    client = CountingClient(["a", "b"])
    h = DemoHandlers(WebConfig(model_list_mode=mode), client)  # type: ignore[arg-type]
    pickers = [await h.load_models(current) for current in (None, "b", "zzz")]
    assert client.calls == calls
    assert [p.value for p, _ in pickers] == ["a", "b", "a"]  # keeps a still-listed choice
    await h.refresh_models(None)
    assert client.calls == calls + 1
    await client.aclose()


@pytest.mark.anyio
async def test_empty_model_list_says_why() -> None:
    client = CountingClient([])
    _, note = await DemoHandlers(WebConfig(), client).load_models(None)
    assert "no worker is registered" in note
    await client.aclose()


def test_add_question_needs_text_and_an_idle_chat() -> None:
    h = DemoHandlers(WebConfig(), CountingClient([]))
    conv = Conversation()
    with pytest.warns(UserWarning, match="Type a question first"):
        h.add_question(conv, "   ", None)
    assert conv.turns == []
    conv.busy = True
    with pytest.warns(UserWarning, match="press Stop"):
        h.add_question(conv, "Hi", None)
    assert conv.turns == []
    conv.busy = False
    _, shown, text, image = h.add_question(conv, " Hi ", None)
    assert shown == [{"role": "user", "content": "Hi"}] and text == "" and image is None


def test_model_request_keeps_answered_exchanges_and_images_in_order(tmp_path: Path) -> None:
    a, b = (str(draw_circle(tmp_path / f"{n}.png", (200, 0, 0))) for n in "ab")
    conv = Conversation()
    conv.add_question("first", a)
    conv.start_answer().text = "ok"
    conv.add_question("stopped before any word", None)
    conv.start_answer()
    conv.add_question("second", b)
    request = conv.model_request()
    roles_texts: list[Any] = [(m["role"], m["content"][-1]["text"]) for m in request.messages]
    assert roles_texts == [("user", "first"), ("assistant", "ok"), ("user", "second")]
    assert request.messages[0]["content"][0] == {"type": "image"} and request.image_paths == [a, b]


def test_encode_image_scales_down_and_converts(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGBA", (3000, 1000), (0, 0, 255, 128)).save(path)
    with Image.open(io.BytesIO(base64.b64decode(encode_image(str(path), 1344)))) as img:
        assert img.mode == "RGB" and img.size == (1344, 448)


def test_a_long_chat_sends_only_the_newest_pictures() -> None:
    """More pictures than a worker takes (8) used to fail every later turn; older turns keep their text."""
    conv = Conversation()
    for i in range(10):
        conv.add_question(f"picture {i}?", f"/tmp/p{i}.png")
        conv.start_answer().text = f"answer {i}"
    conv.add_question("and now?", None)
    request = conv.model_request(max_images=8)
    assert request.image_paths == [f"/tmp/p{i}.png" for i in range(2, 10)]
    parts = [m["content"] for m in request.messages if m["role"] == "user"]
    assert [p[0]["type"] for p in parts[:10]] == ["text", "text"] + ["image"] * 8
    assert parts[0][-1]["text"] == "picture 0?" and len(request.messages) == 21
