"""Controller + real model worker + OpenAI API as processes, driven by the official openai client."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import openai
import pytest
from PIL import Image

from tests.procs import ProcGroup, free_port


def data_url(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def stack(tiny_llava):
    cport, wport, aport = free_port(), free_port(), free_port()
    with ProcGroup() as group:
        group.start(["llava_serve.controller", "--port", str(cport), "--registration-secret", "s3",
                     "--heart-beat-interval", "1", "--heart-beat-expiration", "10"], cport)  # fmt: skip
        group.start(
            [
                "llava_serve.model_worker",
                "--model-path",
                str(tiny_llava),
                "--device",
                "cpu",
                "--port",
                str(wport),
                "--controller-address",
                f"http://localhost:{cport}",
                "--worker-address",
                f"http://localhost:{wport}",
                "--registration-secret",
                "s3",
                "--heart-beat-interval",
                "2",
                "--model-name",
                "tiny-llava",
            ],
            wport,
            ready_path="/ready",
            timeout=120,
        )
        group.start(
            [
                "llava_serve.openai_api",
                "--port",
                str(aport),
                "--controller-address",
                f"http://localhost:{cport}",
                "--api-key",
                "k1",
            ],
            aport,
        )
        client = openai.OpenAI(base_url=f"http://localhost:{aport}/v1", api_key="k1", max_retries=0)
        for _ in range(100):
            if [m.id for m in client.models.list().data] == ["tiny-llava"]:
                break
            time.sleep(0.2)
        yield client


def ask(client, content, **kw):
    return client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=12, **kw
    )


def test_answer_equals_generate_cli(stack, tiny_llava, tmp_path):
    url = data_url((200, 30, 30))
    reply = ask(stack, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])
    image = tmp_path / "img.png"
    image.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_serve",
            "generate",
            "--model-path",
            str(tiny_llava),
            "--device",
            "cpu",
            "--image",
            str(image),
            "--prompt",
            "What is it?",
            "--max-new-tokens",
            "12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # the API drops the answer's leading whitespace (docs/openai_api.md); the CLI's JSON keeps the raw text
    assert reply.choices[0].message.content == json.loads(cli.stdout)["text"].lstrip()
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_and_images_matter(stack):
    content = [
        {"type": "image_url", "image_url": {"url": data_url((20, 200, 30))}},
        {"type": "image_url", "image_url": {"url": data_url((20, 30, 220))}},
        {"type": "text", "text": "Compare them."},
    ]
    full = ask(stack, content).choices[0].message.content
    for _ in range(3):  # a worker that outruns its reader merges frames (latest value): on a loaded
        # machine a 12-token answer can come as one; it must come in pieces at least once in three
        chunks = ask(stack, content, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert "".join(parts) == full
        assert usage is not None and usage.completion_tokens == 12
        if len(parts) > 1:
            break
    assert len(parts) > 1, parts
    swapped = ask(stack, [content[1], content[0], content[2]]).choices[0].message.content
    assert swapped != full


def test_multi_turn_and_errors(stack):
    turn1 = [{"type": "image_url", "image_url": {"url": data_url((240, 200, 0))}}, {"type": "text", "text": "Hi"}]
    first = ask(stack, turn1).choices[0].message.content
    reply = stack.chat.completions.create(
        model="tiny-llava",
        messages=[
            {"role": "user", "content": turn1},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And now?"},
        ],
        temperature=0,
        max_tokens=5,
    )
    assert reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="image"):
        ask(stack, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    with pytest.raises(openai.NotFoundError):
        stack.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=str(stack.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_models_retrieve_and_openai_error_shapes(stack):
    assert stack.models.retrieve("tiny-llava").id == "tiny-llava"
    with pytest.raises(openai.NotFoundError) as info:
        stack.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"
    for method, path, status, code in (
        ("GET", "/v1/nope", 404, "not_found"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ):
        resp = stack._client.request(
            method, str(stack.base_url).rstrip("/") + path.removeprefix("/v1"), headers={"authorization": "Bearer k1"}
        )
        assert resp.status_code == status and resp.json()["error"]["code"] == code, resp.text


def test_legacy_completions_raw_prompt_images_n_echo_and_stream(stack):
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    url = data_url((30, 200, 30))
    one = stack.completions.create(
        model="tiny-llava", prompt=prompt, max_tokens=8, temperature=0, extra_body={"images": [url]}
    )
    assert one.object == "text_completion" and one.choices[0].finish_reason in ("stop", "length")
    assert one.usage is not None and 1 <= one.usage.completion_tokens <= 8
    again = stack.completions.create(
        model="tiny-llava", prompt=prompt, max_tokens=8, temperature=0, extra_body={"images": [url]}
    )
    assert again.choices[0].text == one.choices[0].text  # greedy: the same raw completion
    echoed = stack.completions.create(
        model="tiny-llava", prompt=prompt, max_tokens=4, temperature=0, echo=True, extra_body={"images": [url]}
    )
    assert echoed.choices[0].text.startswith(prompt)
    several = stack.completions.create(
        model="tiny-llava",
        prompt=["USER: hi ASSISTANT:", "USER: yo ASSISTANT:"],
        max_tokens=5,
        temperature=1.0,
        n=2,
        seed=3,
    )
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    chunks = list(
        stack.completions.create(
            model="tiny-llava", prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body={"images": [url]}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == one.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        stack.completions.create(model="tiny-llava", prompt=prompt, max_tokens=4)  # the image is missing
    assert info.value.body["code"] == "image_count_mismatch"


SHAPES = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"], "additionalProperties": False}}}  # fmt: skip


def test_n_samples_differ_and_a_seed_repeats_them(stack):
    def four(seed):
        r = stack.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": "hi"}], n=4,
                                          temperature=1.0, max_tokens=8, seed=seed)  # fmt: skip
        return [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]

    first = four(5)
    assert len(set(first)) > 1 and four(5) == first


def test_logprobs_streaming_and_not(stack):
    kw = {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 6,
          "logprobs": True, "top_logprobs": 2}  # fmt: skip
    reply = stack.chat.completions.create(**kw)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy
    streamed = [t for c in stack.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]  # fmt: skip
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_penalties_and_json_schema(stack):
    import jsonschema

    reply = stack.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "Shapes as JSON"}], temperature=1.0, n=4, seed=1,
        max_tokens=48, presence_penalty=0.5, frequency_penalty=0.5,
        response_format={"type": "json_schema", "json_schema": {"name": "shapes", "schema": SHAPES}},
    )  # fmt: skip
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), SHAPES)
    obj = stack.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": "JSON"}],
                                        max_tokens=48, response_format={"type": "json_object"})  # fmt: skip
    assert obj.choices[0].finish_reason != "stop" or isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllm_guided_choice_regex_and_json_through_the_openai_client(stack):
    """vLLM's structured-output extensions, sent as vLLM's clients send them (extra_body)."""
    import re

    import jsonschema

    kw = {"model": "tiny-llava", "messages": [{"role": "user", "content": "Pick one"}], "max_tokens": 40,
          "temperature": 1.0, "n": 4}  # fmt: skip
    choices = ["red square", "blue (circle)", "a.b|c"]  # regex metacharacters are matched literally
    reply = stack.chat.completions.create(seed=3, extra_body={"guided_choice": choices}, **kw)
    assert [c.message.content for c in reply.choices if c.message.content not in choices] == []
    assert all(c.finish_reason == "stop" for c in reply.choices)
    pattern = r"(yes|no), [0-9]{1,3} shapes"
    reply = stack.chat.completions.create(seed=4, extra_body={"guided_regex": pattern}, **kw)
    for c in reply.choices:
        assert re.fullmatch(pattern, c.message.content), c.message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in stack.chat.completions.create(
        stream=True, **{**kw, "n": 1}, extra_body={"guided_choice": choices}) if c.choices)  # fmt: skip
    assert streamed in choices
    reply = stack.chat.completions.create(seed=5, extra_body={"guided_json": SHAPES}, **{**kw, "max_tokens": 160})
    for c in reply.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SHAPES)
    text = stack.chat.completions.create(seed=5, extra_body={"guided_json": json.dumps(SHAPES)}, **{**kw, "n": 1,
                                         "max_tokens": 160})  # fmt: skip
    jsonschema.validate(json.loads(text.choices[0].message.content), SHAPES)  # the schema as JSON text too
    with pytest.raises(openai.BadRequestError, match="guided_json is not valid JSON"):
        stack.chat.completions.create(extra_body={"guided_json": "{not json"}, **kw)
    with pytest.raises(openai.BadRequestError, match="set one of guided_choice, guided_regex") as info:
        stack.chat.completions.create(extra_body={"guided_choice": ["a"], "guided_regex": "b"}, **kw)
    assert info.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError, match="non-empty"):
        stack.chat.completions.create(extra_body={"guided_choice": ["a", ""]}, **kw)
    with pytest.raises(openai.BadRequestError, match="regex"):
        stack.chat.completions.create(extra_body={"guided_regex": "(unclosed"}, **kw)
    with pytest.raises(openai.BadRequestError, match="guided_choice is not supported") as info:  # not ignored
        stack.completions.create(model="tiny-llava", prompt="USER: hi ASSISTANT:", extra_body={"guided_choice": ["a"]})
    reply = stack.chat.completions.create(**{**kw, "n": 1})  # and the API serves plain requests after them
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_forced_tool_calls_streaming_and_not(stack):
    import jsonschema

    kw = {"model": "tiny-llava", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
          "max_tokens": 120, "temperature": 0.8, "seed": 2}  # fmt: skip
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = stack.chat.completions.create(tool_choice=choice, **kw)
        assert reply.choices[0].message.tool_calls, (reply.choices[0].message.content, reply.choices[0].finish_reason)
        (call,) = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(stack.chat.completions.create(tool_choice="required", stream=True, **kw))
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert calls and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = [*kw["messages"], {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function":
               {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]  # fmt: skip
    follow = stack.chat.completions.create(**{**kw, "messages": history}, tool_choice="none")
    assert follow.choices[0].message.content is not None and not follow.choices[0].message.tool_calls
