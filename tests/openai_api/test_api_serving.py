"""The API in-process, driven by the official `openai` client (ASGI transport), with the
controller and worker mocked at the HTTP level: request mapping, streaming shape, errors."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest

from llava_serve.errors import InvalidParameter, NoWorker, ServeError, UnknownModel
from llava_serve.openai_api.app import create_app
from llava_serve.openai_api.config import ApiConfig
from llava_serve.protocol.frames import FinishReason, Frame, Usage, encode_frame
from tests.fakes.images import data_url, png_bytes

pytestmark = pytest.mark.anyio
WORDS = ["Hello", " there", ",", " red", " square", "."]


def frames(words: list[str] = WORDS, finish: str = "stop", error_at: int | None = None, n: int = 1) -> bytes:
    """A worker's chat stream: n choices, frames interleaved, each with its index when n > 1."""
    out: list[Frame] = []
    for i in range(len(words)):
        for index in range(n):
            if i == error_at:
                out.append(Frame.failure(50007, "engine died", index=index if n > 1 else None))
                return b"".join(encode_frame(f) for f in out)
            frame = Frame(text="".join(words[: i + 1]), index=index if n > 1 else None)
            if i == len(words) - 1:
                frame.finish_reason, frame.usage = FinishReason(finish), Usage.of(20, len(words))
            out.append(frame)
    return b"".join(encode_frame(f) for f in out)


def refusal(status: int, err: ServeError, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=encode_frame(err.frame()), headers=headers)


class Cluster:
    """A controller at controller.test, as an HTTP mock that behaves like the real one in front of a
    worker with a context of 100 tokens: every request it gets is recorded."""

    def __init__(self) -> None:
        self.models = ["fake"]
        self.available = True
        self.controller_down = False
        self.requests: list[tuple[str, str]] = []  # (host, path) of every call the API made
        self.generations: list[dict[str, Any]] = []  # chat bodies that started generating
        self.generate: Callable[[dict[str, Any]], httpx.Response] = lambda body: httpx.Response(
            200, content=frames(n=body.get("n", 1))
        )

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        route = (request.url.host, request.url.path)
        self.requests.append(route)
        if request.url.host == "controller.test" and self.controller_down:
            raise httpx.ConnectError("connection refused", request=request)
        if route == ("controller.test", "/list_models"):
            return httpx.Response(200, json={"models": self.models})
        if route == ("controller.test", "/worker_chat_stream"):
            return self.chat(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def chat(self, body: dict[str, Any]) -> httpx.Response:
        if body["model"] not in self.models:
            return refusal(404, UnknownModel(f"model {body['model']!r} does not exist"))
        if not self.available:
            return refusal(503, NoWorker("every worker of model 'fake' is out of rotation"))
        if body.get("max_new_tokens", 0) >= 100:
            err = InvalidParameter(f"max_tokens {body['max_new_tokens']} exceeds the model's context of 100")
            return refusal(400, err.__class__(err.message, param="max_tokens"))
        response = self.generate(body)
        if response.status_code == 200:
            self.generations.append(body)
        return response


@pytest.fixture
async def env() -> AsyncIterator[tuple[openai.AsyncOpenAI, Cluster]]:
    cluster = Cluster()
    config = ApiConfig(controller_address="http://controller.test", api_keys=("sk-test",), max_images_per_request=3)
    app = create_app(config, transport=httpx.MockTransport(cluster))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
        yield (
            openai.AsyncOpenAI(base_url="http://api.test/v1", api_key="sk-test", http_client=http, max_retries=0),
            cluster,
        )


def user(text: str, *images: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": "user", "content": parts}


async def test_request_mapped_to_worker_body(env: tuple[openai.AsyncOpenAI, Cluster]) -> None:
    client, cluster = env
    messages = [
        {"role": "developer", "content": "Be brief."},
        user("Compare", data_url("red"), data_url("green")),
        {"role": "assistant", "content": "Red and green."},
        {"role": "user", "content": "And now?"},
    ]
    resp = await client.chat.completions.create(
        model="fake", messages=messages, temperature=0.3, top_p=0.9, max_tokens=50,  # type: ignore[arg-type]
        max_completion_tokens=7, stop="END", seed=5, n=2,
    )  # fmt: skip
    assert [c.message.content for c in resp.choices] == ["Hello there, red square."] * 2
    assert [c.finish_reason for c in resp.choices] == ["stop", "stop"]
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (20, 12)
    (body,) = cluster.generations  # one generation for both choices: the images travel once
    assert cluster.requests == [("controller.test", "/worker_chat_stream")]  # one call, no lookups
    assert body["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red and green."}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]  # fmt: skip
    assert body["images"] == [base64.b64encode(png_bytes(c)).decode() for c in ("red", "green")]
    assert {k: body[k] for k in ("model", "temperature", "top_p", "max_new_tokens", "stop", "n", "seed")} == {
        "model": "fake", "temperature": 0.3, "top_p": 0.9, "max_new_tokens": 7, "stop": ["END"], "n": 2, "seed": 5,
    }  # fmt: skip


async def test_streaming_chunks_usage_and_n(env: tuple[openai.AsyncOpenAI, Cluster]) -> None:
    client, _ = env
    stream = await client.chat.completions.create(
        model="fake", messages=[user("hi", data_url())], stream=True, n=2, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    by_choice: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        by_choice[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert by_choice == {0: "Hello there, red square.", 1: "Hello there, red square."}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (20, 12)
    assert len({c.id for c in chunks}) == 1


async def test_length_finish_and_no_usage_unless_asked(env: tuple[openai.AsyncOpenAI, Cluster]) -> None:
    client, cluster = env
    cluster.generate = lambda body: httpx.Response(200, content=frames(finish="length"))
    stream = await client.chat.completions.create(model="fake", messages=[user("hi")], stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_leading_whitespace_of_the_answer_is_dropped(env: tuple[openai.AsyncOpenAI, Cluster]) -> None:
    client, cluster = env
    words = [" ", " It", " is", " red", ".", "\n"]
    cluster.generate = lambda body: httpx.Response(200, content=frames(words))
    resp = await client.chat.completions.create(model="fake", messages=[user("hi")])
    assert resp.choices[0].message.content == "It is red.\n"
    stream = await client.chat.completions.create(model="fake", messages=[user("hi")], stream=True)
    deltas = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert deltas == ["It", " is", " red", ".", "\n"]


async def test_mid_stream_worker_error(env: tuple[openai.AsyncOpenAI, Cluster]) -> None:
    client, cluster = env
    cluster.generate = lambda body: httpx.Response(200, content=frames(error_at=3))
    stream = await client.chat.completions.create(model="fake", messages=[user("hi")], stream=True)
    got = ""
    with pytest.raises(openai.APIError, match="engine died"):
        async for c in stream:
            got += c.choices[0].delta.content or ""
    assert got == "Hello there,"  # what came before the failure was delivered
    with pytest.raises(openai.APIStatusError, match="engine died") as info:
        await client.chat.completions.create(model="fake", messages=[user("hi")])
    assert info.value.status_code == 503


async def test_garbled_frame_is_an_error_not_a_cut(env: tuple[openai.AsyncOpenAI, Cluster]) -> None:
    client, cluster = env
    cluster.generate = lambda body: httpx.Response(200, content=frames()[:40] + b"<html>\0")
    stream = await client.chat.completions.create(model="fake", messages=[user("hi")], stream=True)
    with pytest.raises(openai.APIError, match="invalid frame"):
        async for _ in stream:
            pass
    with pytest.raises(openai.APIStatusError, match="invalid frame") as info:
        await client.chat.completions.create(model="fake", messages=[user("hi")])
    assert info.value.status_code == 502


def _worker_refusal(status: int, code: int, text: str, **headers: str) -> Callable[..., httpx.Response]:
    return lambda body: httpx.Response(status, content=encode_frame(Frame.failure(code, text)), headers=headers)


@pytest.mark.parametrize(
    ("setup", "status", "code", "param"),
    [
        (lambda c: setattr(c, "models", ["other"]), 404, "model_not_found", None),
        (lambda c: setattr(c, "available", False), 503, "controller_no_worker", None),
        (lambda c: setattr(c, "controller_down", True), 503, "internal_error", None),
        (lambda c: setattr(c, "generate", lambda b: httpx.Response(404, json={"detail": "Not Found"})),
         502, "controller_worker_timeout", None),
        (lambda c: setattr(c, "generate", _worker_refusal(429, 42903, "busy", **{"retry-after": "3"})),
         429, "rate_limit_exceeded", None),
        (lambda c: setattr(c, "generate", _worker_refusal(400, 40004, "2 placeholders, 1 image")),
         400, "image_count_mismatch", None),
        (lambda c: setattr(c, "generate", _worker_refusal(400, 40303, "prompt too long")),
         400, "context_length_exceeded", None),
        (lambda c: setattr(c, "generate", _worker_refusal(503, 50005, "no worker")), 503, "controller_no_worker", None),
        (lambda c: setattr(c, "generate", lambda b: httpx.Response(502, text="<html>bad gateway</html>")),
         502, "controller_worker_timeout", None),
    ],
)  # fmt: skip
async def test_upstream_errors_mapped(
    env: tuple[openai.AsyncOpenAI, Cluster], setup: Any, status: int, code: str, param: str | None
) -> None:
    client, cluster = env
    setup(cluster)
    for stream in (False, True):  # refusals before the first token are HTTP errors in both modes
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="fake", messages=[user("hi")], stream=stream)
        assert info.value.status_code == status
        assert info.value.body["code"] == code, info.value.body  # type: ignore[index]
        assert info.value.body["message"]  # type: ignore[index]
    if status == 429:
        assert info.value.response.headers["retry-after"] == "3"


@pytest.mark.parametrize(
    ("kwargs", "param", "match"),
    [
        ({"messages": [user("hi", "")]}, "messages[0].content[1].image_url", "missing"),
        ({"messages": [user("hi", "data:image/png;base64,!!")]}, "messages[0].content[1].image_url", "base64"),
        ({"messages": [user("hi", "https://example.com/a.png")]}, "messages[0].content[1].image_url",
         "remote image URLs are disabled"),
        ({"messages": [user("hi", *[data_url()] * 4)]}, "messages", "at most 3"),
        ({"messages": [user("hi")], "n": 9}, "n", "at most 8"),
        ({"messages": [user("hi")], "max_tokens": 101}, "max_tokens", "context of 100"),
        ({"messages": [user("hi")], "temperature": 5}, "temperature", "less than or equal to 2"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [user("hi")], "functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"messages": [user("hi")], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"messages": [user("hi")], "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "not in tools"),
        ({"messages": [user("hi")], "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"messages": [user("hi")], "presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
        ({"messages": [user("hi")], "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"messages": [user("hi")], "max_tokens": 1_000_001}, "max_tokens", "less than or equal to 1000000"),
        ({"messages": [user("hi")], "max_completion_tokens": 1_000_001}, "max_completion_tokens", "1000000"),
    ],
)  # fmt: skip
async def test_bad_requests(env: tuple[openai.AsyncOpenAI, Cluster], kwargs: dict[str, Any], param: str,
                            match: str) -> None:  # fmt: skip
    client, cluster = env
    with pytest.raises(openai.BadRequestError, match=match) as info:
        await client.chat.completions.create(model="fake", **kwargs)
    assert info.value.body["param"] == param  # type: ignore[index]
    assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert cluster.generations == []  # refused before any generation started


async def test_completions_max_tokens_beyond_any_worker_is_a_400_not_a_500(
    env: tuple[openai.AsyncOpenAI, Cluster],
) -> None:
    """Found by the schema fuzzer: the legacy route built the worker body with it and failed (500)."""
    client, cluster = env
    with pytest.raises(openai.BadRequestError, match="less than or equal to 1000000") as info:
        await client.completions.create(model="fake", prompt="hi", max_tokens=1_000_001)
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    assert cluster.generations == []


async def test_keys_and_models(env: tuple[openai.AsyncOpenAI, Cluster]) -> None:
    client, _ = env
    assert [m.id for m in (await client.models.list()).data] == ["fake"]
    for key in ("wrong", ""):
        other = client.with_options(api_key=key) if key else client.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as info:
            await other.models.list()
        assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            await other.chat.completions.create(model="fake", messages=[user("hi")])


def test_cli_flags_build_the_config() -> None:
    from llava_serve.openai_api.__main__ import main
    from llava_serve.openai_api.config import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args([]))
    assert (config.host, config.port, config.controller_address) == ("127.0.0.1", 8000, "http://localhost:21001")
    assert (config.max_images_per_request, config.allow_remote_images, config.api_keys) == (8, False, ())
    argv = ["--api-key", "k1", "--api-key", "k2", "--allow-remote-images", "--max-image-bytes", "1000",
            "--remote-image-timeout", "2", "--controller-api-key", "c"]  # fmt: skip
    config = config_from_args(build_parser().parse_args(argv))
    assert config.api_keys == ("k1", "k2") and config.controller_api_key == "c"
    assert config.image_policy().allow_remote and config.image_policy().max_bytes == 1000
    for bad in (["--controller-address", "localhost:21001"], ["--max-n", "0"]):
        with pytest.raises(SystemExit) as info:
            main(bad)
        assert info.value.code == 2
