"""Log-probabilities, OpenAI's penalties and structured output on a real tiny LLaVA (in-process worker,
real engine): checked against a plain forward pass, a by-hand penalty, and jsonschema."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import torch

from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request
from llava_serve.engine.sampler import apply_openai_penalties, sample
from llava_serve.models.base import EncodedPrompt
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.protocol.frames import Frame, TokenLogprob, iter_frames_sync
from llava_serve.worker.app import create_app
from llava_serve.worker.config import WorkerConfig

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe the shapes."}]


@pytest.fixture(scope="module")
def worker(tiny_llava) -> Iterator[tuple[httpx.AsyncClient, Any]]:  # type: ignore[no-untyped-def]
    lm = load_model(LoadOptions(model_path=str(tiny_llava), device="cpu"))
    engine = BatchEngine(lm, max_running=4, max_waiting=16).start()
    app = create_app(WorkerConfig(no_register=True), lm, engine)
    try:
        yield httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w", timeout=120), lm
    finally:
        engine.shutdown()


def run(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> dict[int, tuple[Frame, list[TokenLogprob]]]:
    """Each choice's last frame and all its token log-probabilities, in order."""
    resp = asyncio.run(client.post(route, json=body))
    assert resp.status_code == 200, resp.text
    out: dict[int, tuple[Frame, list[TokenLogprob]]] = {}
    for frame in iter_frames_sync([resp.content]):
        assert frame.error_code == 0, frame
        _, seen = out.get(frame.index or 0, (frame, []))
        out[frame.index or 0] = (frame, seen + (frame.logprobs or []))
    return out


def test_logprobs_equal_a_plain_forward_pass(worker) -> None:  # type: ignore[no-untyped-def]
    client, lm = worker
    prompt = "USER: hello there ASSISTANT:"
    body = {"prompt": prompt, "temperature": 1.0, "seed": 11, "max_new_tokens": 10, "ignore_eos": True,
            "logprobs": 3, "echo": False}  # fmt: skip
    ((last, entries),) = run(client, "/worker_generate_stream", body).values()
    assert last.usage is not None and len(entries) == last.usage.completion_tokens == 10
    ids = torch.tensor([lm.encode(prompt, []).input_ids])
    steps, token_ids = [], []
    with torch.inference_mode():
        for entry in entries:  # teacher-forced: the model's distribution before each sampled token
            step = lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            # OpenAI's entries name tokens by text: the sampled one is the token of that text and logprob
            candidates = [t for t in range(step.shape[0]) if lm.tokenizer.decode([t]) == entry.token]
            tid = min(candidates, key=lambda t: abs(step[t].item() - entry.logprob))
            steps.append(step)
            token_ids.append(tid)
            ids = torch.cat([ids, torch.tensor([[tid]])], dim=1)
    for step, tid, entry in zip(steps, token_ids, entries):
        assert entry.logprob == pytest.approx(step[tid].item(), abs=1e-4)
        best = step.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [lm.tokenizer.decode([t]) for t in best.indices.tolist()]
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in entries) == last.text  # the tokens spell the answer


def test_openai_penalties_by_hand() -> None:
    row = torch.zeros(6)
    out = apply_openai_penalties(row, [1, 1, 1, 4], presence=0.5, frequency=0.25)
    assert out.tolist() == [0.0, -1.25, 0.0, 0.0, -0.75, 0.0]
    assert apply_openai_penalties(row, [], 2.0, 2.0) is row


def test_the_sampler_applies_penalties_before_choosing() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    req = Request(EncodedPrompt([0], []), SamplingParams(temperature=0, frequency_penalty=0.3), sink=print)
    req.output_ids = [1, 1]  # token 1 twice: 3.0 - 0.6 < 2.5
    assert sample(logits, [req]) == [2]
    assert sample(logits, [Request(EncodedPrompt([0], []), SamplingParams(temperature=0), sink=print)]) == [1]


def test_penalised_requests_run_through_the_worker(worker) -> None:  # type: ignore[no-untyped-def]
    client, _ = worker
    body = {"prompt": "USER: hi ASSISTANT:", "temperature": 0.7, "seed": 1, "max_new_tokens": 24, "ignore_eos": True,
            "presence_penalty": 1.5, "frequency_penalty": 2.0}  # fmt: skip
    ((frame, _),) = run(client, "/worker_generate_stream", body).values()
    assert frame.usage is not None and frame.usage.completion_tokens == 24


def test_json_schema_output_validates_20_of_20_at_temperature_1(worker) -> None:  # type: ignore[no-untyped-def]
    client, _ = worker
    answers = []
    for seed in range(5):
        body = {"messages": MESSAGES, "n": 4, "temperature": 1.0, "seed": seed, "max_new_tokens": 48,
                "response_format": {"type": "json_schema", "schema": SCHEMA}}  # fmt: skip
        answers += [frame for frame, _ in run(client, "/worker_chat_stream", body).values()]
    assert len(answers) == 20
    for frame in answers:
        assert frame.finish_reason is not None and frame.finish_reason.value == "stop", frame
        jsonschema.validate(json.loads(frame.text), SCHEMA)


def test_a_schema_that_cannot_be_compiled_is_a_400(worker) -> None:  # type: ignore[no-untyped-def]
    client, _ = worker
    body = {"messages": MESSAGES, "response_format": {"type": "json_schema", "schema": {"type": "no-such-type"}}}
    resp = asyncio.run(client.post("/worker_chat_stream", json=body))
    frame = Frame.model_validate(resp.json())
    assert resp.status_code == 400 and frame.param == "response_format", frame


def test_a_regex_constraint_holds_through_the_engine(worker) -> None:  # type: ignore[no-untyped-def]
    """What benchmarks/multiturn_ttft.py --answer-regex gives the random model: answers of words."""
    import queue
    import re

    from llava_serve.engine.constraint import Constraint

    _, lm = worker
    engine = BatchEngine(lm, max_running=2, max_waiting=4).start()
    pattern = r" [a-z]{2,6}( [a-z]{2,6}){1,3}\."
    try:
        for seed in range(4):
            outputs: queue.Queue[Any] = queue.Queue()
            params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=64)
            prompt = EncodedPrompt(input_ids=lm.tokenizer("USER: hi ASSISTANT:").input_ids)
            req = Request(prompt=prompt, params=params, sink=outputs.put)
            req.constraint = Constraint({"type": "regex", "pattern": pattern}, lm.tokenizer)
            engine.submit(req)
            out = outputs.get(timeout=120)
            while not out.finished:
                out = outputs.get(timeout=120)
            assert out.finish_reason == "stop", out
            assert re.fullmatch(pattern, out.text), out.text
    finally:
        engine.shutdown()
