"""FastChat 0.2.36's requests (tests/compat/fixtures.py), replayed against a real worker and controller."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
from typing import Any

import httpx
import pytest
import torch

from llava_serve.protocol.frames import iter_frames_sync
from llava_serve.worker.app import create_app as create_worker
from llava_serve.worker.config import WorkerConfig
from tests.compat import fixtures
from tests.compat.conftest import TEXT_WORKER, WORKER, Stack
from tests.fakes.images import data_url

MODEL = "llava-shapes"


def test_api_server_conversation_renders_the_models_own_prompt(stack: Stack) -> None:
    conv = stack.post(stack.worker, "/worker_get_conv_template", {"model": MODEL}).json()["conv"]
    assert conv["sep_style"] == 2 and conv["roles"] == ["USER", "ASSISTANT"]  # FastChat's ADD_COLON_TWO
    assert (conv["sep"], conv["sep2"], conv["messages"], conv["offset"]) == (" ", "</s>", [], 0)
    # FastChat's get_prompt for one user turn and the open assistant turn (ADD_COLON_TWO):
    prompt = conv["system_template"].format(system_message=conv["system_message"]) + conv["sep"]
    prompt += f"USER: Describe the image.{conv['sep']}ASSISTANT:"
    assert prompt == fixtures.fastchat_api_gen_params(MODEL, None)["prompt"]
    assert prompt == stack.lm.build_prompt([{"role": "user", "content": "Describe the image."}])


def test_count_token_counts_an_image_prompt_sent_without_images(stack: Stack) -> None:
    gen = fixtures.fastchat_api_gen_params(MODEL, data_url("red"))
    counted = stack.post(stack.worker, "/count_token", {"model": MODEL, "prompt": gen["prompt"]})
    assert counted.status_code == 200, counted.text
    reply = stack.post(stack.worker, "/worker_generate", gen, **fixtures.FASTCHAT_API_HEADERS).json()
    assert reply["error_code"] == 0 and counted.json()["count"] == reply["usage"]["prompt_tokens"]
    text_only = stack.post(stack.worker, "/count_token", {"model": MODEL, "prompt": "USER: hi ASSISTANT:"}).json()
    assert counted.json()["count"] > text_only["count"] + 30  # the image's tokens are in


@pytest.mark.parametrize("route", ["/worker_generate", "/worker_generate_stream"])
def test_api_server_text_and_image_chats_answer(stack: Stack, route: str) -> None:
    for image in (None, data_url("red")):
        resp = stack.post(stack.worker, route, fixtures.fastchat_api_gen_params(MODEL, image))
        assert resp.status_code == 200, resp.text
        (*_, last) = iter_frames_sync([resp.content])
        assert last.error_code == 0 and last.text.strip() and last.usage is not None
        if image is not None:
            assert "red" in last.text.lower()  # the bundled model sees the picture


def test_fastchat_test_message_gets_an_answer(stack: Stack) -> None:
    address = stack.post(stack.controller, "/get_worker_address", {"model": MODEL}).json()["address"]
    assert address == WORKER
    body = fixtures.fastchat_test_message(MODEL)
    resp = stack.post(stack.worker, "/worker_generate_stream", body, **fixtures.FASTCHAT_TEST_MESSAGE_HEADERS)
    frames = list(iter_frames_sync([resp.content]))
    assert all(f.error_code == 0 for f in frames) and frames[-1].text.strip()


def _fastchat_reference(stack: Stack, texts: list[str]) -> torch.Tensor:
    """FastChat model_worker's pooling: one padded batch, masked sum, L2 normalisation."""
    ids = [stack.lm.tokenizer(t).input_ids for t in texts]
    width = max(map(len, ids))
    batch = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    with torch.inference_mode():
        hidden = stack.lm.model(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    summed = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum()
    return torch.nn.functional.normalize(summed.float(), p=2, dim=1)


def test_embeddings_are_fastchats_pooled_hidden_states(stack: Stack) -> None:
    texts = ["a red circle", "two blue squares on the left"]
    resp = stack.post(stack.worker, "/worker_get_embeddings", fixtures.fastchat_api_embeddings(MODEL, texts))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    got = torch.tensor(body["embedding"])
    assert body["token_num"] == sum(len(stack.lm.tokenizer(t).input_ids) for t in texts)
    assert torch.allclose(got, _fastchat_reference(stack, texts), atol=1e-4)
    packed = stack.post(stack.worker, "/worker_get_embeddings", {"input": texts, "encoding_format": "base64"})
    first = struct.unpack(f"<{got.shape[1]}f", base64.b64decode(packed.json()["embedding"][0]))
    assert torch.allclose(torch.tensor(first), got[0], atol=1e-6)


def test_embeddings_refuse_what_does_not_fit(stack: Stack) -> None:
    long = "red " * (stack.lm.context_length + 10)
    resp = stack.post(stack.worker, "/worker_get_embeddings", {"input": [long]})
    assert resp.status_code == 400 and resp.json()["error_code"] == 40303
    assert stack.post(stack.worker, "/worker_get_embeddings", {"input": []}).status_code == 400
    assert stack.engine.queue_length() == 0 and stack.engine.is_alive()


def test_controller_lists_models_by_the_workers_multimodal_flag(stack: Stack) -> None:
    # our worker registered as the fixture's Registrar body says (multimodal: true); a FastChat text worker:
    text_worker = fixtures.fastchat_register(TEXT_WORKER, "vicuna", multimodal=False)
    assert stack.post(stack.controller, "/register_worker", text_worker).status_code == 200
    try:
        assert stack.post(stack.controller, "/list_multimodal_models").json() == {"models": [MODEL]}
        assert stack.post(stack.controller, "/list_language_models").json() == {"models": ["vicuna"]}
        assert stack.post(stack.controller, "/list_models").json() == {"models": [MODEL, "vicuna"]}
        assert asyncio.run(stack.controller.get("/test_connection")).json() == "success"
    finally:
        stack.post(stack.controller, "/unregister_worker", {"worker_name": TEXT_WORKER})
    stack.post(stack.controller, "/refresh_all_workers")  # re-registers: the flag is kept
    assert stack.post(stack.controller, "/list_multimodal_models").json() == {"models": [MODEL]}


def test_a_template_without_a_fastchat_form_is_refused_in_words(stack: Stack) -> None:
    def gemma(messages: Any, add_generation_prompt: bool) -> str:
        turns = "".join(f"<start_of_turn>{m['role']}\n{m['content']}<end_of_turn>\n" for m in messages)
        return turns + ("<start_of_turn>model\n" if add_generation_prompt else "")

    lm = dataclasses.replace(stack.lm, prompt_builder=gemma, template_name="hf-chat-template")
    app = create_worker(WorkerConfig(no_register=True), lm, stack.engine)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=WORKER)
    resp = stack.post(client, "/worker_get_conv_template", {"model": MODEL})
    assert resp.status_code == 501 and "no FastChat Conversation form" in resp.json()["text"]
