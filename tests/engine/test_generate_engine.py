"""GenerateEngine (the LLaVA way: a thread per request running model.generate) on a tiny random LLaVA.

Checked token for token against `model.generate` with input_ids + pixel_values, and against
BatchEngine on the same requests, so the two engines compared by `llava-serve bench` agree.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.generate_engine import GenerateEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request, RequestOutput
from llava_serve.errors import ImageCountMismatch, InvalidRequest, Overloaded
from llava_serve.models.base import LoadedModel
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.tools.checkpoints.build import build

WAIT = 30.0
COLOURS = [(220, 30, 30), (30, 200, 40), (20, 40, 230), (240, 220, 20)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build("llava", "tiny", Path(tmp_path_factory.mktemp("ckpt")) / "tiny-llava")
    return load_model(LoadOptions(model_path=str(path), device="cpu"))


class Collector:
    """A sink that records every output and counts final ones (each request must end exactly once)."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.done = threading.Event()
        self.first = threading.Event()
        self.gate: threading.Event | None = None  # when set, the engine thread blocks until released

    def __call__(self, out: RequestOutput) -> None:
        self.outputs.append(out)
        self.first.set()
        if out.finished:
            self.done.set()
        elif self.gate is not None:
            self.gate.wait(WAIT)

    @property
    def final(self) -> RequestOutput:
        assert self.done.wait(WAIT), "the request never finished"
        finals = [o for o in self.outputs if o.finished]
        assert len(finals) == 1, f"{len(finals)} final outputs"
        return finals[0]


def image(i: int) -> Image.Image:
    return Image.new("RGB", (48 + 8 * i, 40), COLOURS[i % len(COLOURS)])


PROMPTS = [
    ("USER: <image>\nWhat colour is this? ASSISTANT:", 1),
    ("USER: Tell me about cats. ASSISTANT:", 0),
    ("USER: <image>\nDescribe the shape in detail please. ASSISTANT:", 1),
    ("USER: <image>\n<image>\nWhich is left? ASSISTANT:", 2),
]


def encode(lm: LoadedModel, n: int):
    prompt, n_images = PROMPTS[n % len(PROMPTS)]
    images = [image(n + j) for j in range(n_images)]
    return lm.encode(prompt, images, [f"img-{n}-{j}" for j in range(n_images)]), images


def reference(lm: LoadedModel, n: int, max_new_tokens: int) -> list[int]:
    """What model.generate gives for the request alone, from input_ids + pixel_values."""
    encoded, images = encode(lm, n)
    ids = torch.tensor([encoded.input_ids])
    kwargs = {}
    if images:
        kwargs["pixel_values"] = torch.cat([u.inputs["pixel_values"] for u in encoded.images])
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )
    return out[0, ids.shape[1] :].tolist()


def request(lm: LoadedModel, n: int, **params) -> tuple[Request, Collector]:
    sink = Collector()
    encoded, _ = encode(lm, n)
    params.setdefault("temperature", 0.0)
    return Request(prompt=encoded, params=SamplingParams(**params), sink=sink), sink


def run_all(engine, reqs: list[tuple[Request, Collector]]) -> list[RequestOutput]:
    for req, _ in reqs:
        engine.submit(req)
    return [sink.final for _, sink in reqs]


@pytest.fixture
def engine(lm: LoadedModel):
    eng = GenerateEngine(lm, max_running=2, max_waiting=8).start()
    yield eng
    eng.shutdown()


def test_greedy_equals_model_generate(lm: LoadedModel, engine: GenerateEngine) -> None:
    reqs = [request(lm, n, max_new_tokens=24) for n in range(5)]  # 5 requests, 2 threads at a time
    finals = run_all(engine, reqs)
    for n, ((req, sink), final) in enumerate(zip(reqs, finals, strict=True)):
        expected = reference(lm, n, 24)
        assert req.output_ids == expected, f"request {n}"
        assert final.text == lm.tokenizer.decode(expected, skip_special_tokens=True)
        assert final.finish_reason == ("stop" if expected[-1] in lm.eos_token_ids else "length")
        assert final.completion_tokens == len(expected)
        assert final.prompt_tokens == req.prompt_len
        streamed = [o.text for o in sink.outputs]
        assert all(b.startswith(a) for a, b in itertools.pairwise(streamed)), "text must only grow"
    assert engine.queue_length() == 0
    assert engine.stats().finished_requests == 5


def test_same_tokens_as_batch_engine(lm: LoadedModel) -> None:
    engine = GenerateEngine(lm, max_running=4, max_waiting=16).start()
    batch = BatchEngine(lm, max_running=4, max_waiting=16).start()
    try:
        stop_token = reference(lm, 2, 8)[5]
        cases = [
            {"max_new_tokens": 20},
            {"max_new_tokens": 20, "ignore_eos": True},
            {"max_new_tokens": 20, "stop_token_ids": (stop_token,)},
            {"max_new_tokens": 16, "repetition_penalty": 1.3},
        ]
        results = {}
        for name, eng in (("generate", engine), ("batch", batch)):
            reqs = [request(lm, n, **kw) for n in range(4) for kw in cases]
            finals = run_all(eng, reqs)
            results[name] = [(r.output_ids, f.text, f.finish_reason) for (r, _), f in zip(reqs, finals, strict=True)]
        assert results["generate"] == results["batch"]
    finally:
        batch.shutdown()
        engine.shutdown()


def test_seeded_sampling_is_reproducible(lm: LoadedModel, engine: GenerateEngine) -> None:
    kw = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7, "max_new_tokens": 16, "ignore_eos": True}
    a, b = (run_all(engine, [request(lm, 0, **kw)])[0] for _ in range(2))
    other = run_all(engine, [request(lm, 0, **{**kw, "seed": 8})])[0]
    assert a.text == b.text and a.completion_tokens == 16
    assert other.text != a.text


def test_stop_string_ends_generation(lm: LoadedModel, engine: GenerateEngine) -> None:
    full = lm.tokenizer.decode(reference(lm, 0, 24), skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the reference text is too short to cut"
    req, sink = request(lm, 0, max_new_tokens=24, stop=(stop,))
    final = run_all(engine, [(req, sink)])[0]
    assert final.finish_reason == "stop"
    assert final.text == full[: full.index(stop)]
    assert all(stop not in o.text for o in sink.outputs)
    assert len(req.output_ids) < 24


def test_cancel_mid_stream(lm: LoadedModel, engine: GenerateEngine) -> None:
    req, sink = request(lm, 1, max_new_tokens=500, ignore_eos=True)
    engine.submit(req)
    assert sink.first.wait(WAIT)
    engine.abort(req)
    final = sink.final
    assert final.finish_reason == "abort"
    assert 0 < final.completion_tokens < 500
    assert engine.queue_length() == 0


def test_overload_then_waiting_cancel(lm: LoadedModel) -> None:
    eng = GenerateEngine(lm, max_running=1, max_waiting=1).start()
    try:
        running, run_sink = request(lm, 0, max_new_tokens=50, ignore_eos=True)
        run_sink.gate = threading.Event()  # holds the running request after its first token
        eng.submit(running)
        assert run_sink.first.wait(WAIT)
        waiting, wait_sink = request(lm, 1, max_new_tokens=4)
        eng.submit(waiting)
        with pytest.raises(Overloaded):
            eng.submit(request(lm, 2, max_new_tokens=4)[0])
        assert eng.queue_length() == 2 and eng.stats().running == 1 and eng.stats().waiting == 1
        eng.abort(waiting)  # a waiting request that is cancelled leaves at once
        assert wait_sink.final.finish_reason == "abort" and wait_sink.final.completion_tokens == 0
        run_sink.gate.set()
        assert run_sink.final.finish_reason == "length"
        late, late_sink = request(lm, 3, max_new_tokens=4)
        eng.submit(late)
        assert late_sink.final.completion_tokens == 4
    finally:
        eng.shutdown()
    assert eng.queue_length() == 0


def test_failure_ends_the_stream_and_engine_keeps_serving(lm: LoadedModel, engine: GenerateEngine) -> None:
    bad, sink = request(lm, 1, max_new_tokens=4)
    bad.prompt.images = encode(lm, 0)[0].images  # features with no image tokens to put them in
    engine.submit(bad)
    final = sink.final
    assert final.finish_reason == "error" and isinstance(final.error, InvalidRequest)
    assert "image features" in final.error.message
    ok = run_all(engine, [request(lm, 0, max_new_tokens=4)])[0]
    assert ok.completion_tokens == 4 and engine.is_ready()
    with pytest.raises(ImageCountMismatch):
        lm.encode("USER: <image> hi", [], [])


def test_shutdown_fails_running_and_waiting(lm: LoadedModel) -> None:
    eng = GenerateEngine(lm, max_running=1, max_waiting=4).start()
    running, run_sink = request(lm, 0, max_new_tokens=400, ignore_eos=True)
    eng.submit(running)
    assert run_sink.first.wait(WAIT)
    waiting, wait_sink = request(lm, 1, max_new_tokens=4)
    eng.submit(waiting)
    eng.shutdown()
    assert run_sink.final.finish_reason == "error" and wait_sink.final.finish_reason == "error"
    assert eng.queue_length() == 0 and not eng.is_alive()


@pytest.mark.parametrize("kind", ["generate", "batch"])
def test_a_failing_request_takes_no_other_with_it(lm: LoadedModel, kind: str) -> None:
    eng = (GenerateEngine if kind == "generate" else BatchEngine)(lm, max_running=4, max_waiting=4)
    reqs = [request(lm, n, max_new_tokens=6) for n in range(3)]
    reqs[1][0].prompt.images = encode(lm, 0)[0].images  # features with no image tokens to put them in
    for req, _ in reqs:  # submitted before start: the batch engine admits all three in one step
        eng.submit(req)
    eng.start()
    try:
        finals = [sink.final for _, sink in reqs]
        assert finals[1].finish_reason == "error" and isinstance(finals[1].error, InvalidRequest)
        for n in (0, 2):
            assert reqs[n][0].output_ids == reference(lm, n, 6)
            assert finals[n].finish_reason in ("length", "stop")
    finally:
        eng.shutdown()
