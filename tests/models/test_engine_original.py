"""The batching engine on original-format checkpoints equals transformers' generate, request by request."""

from __future__ import annotations

import queue

import pytest

from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request
from tests.models.greedy import generate_greedy


@pytest.mark.parametrize("kind", ["original", "original-projector", "original-lora", "anyres"])
def test_concurrent_requests_equal_generate(kind, load_original, images):
    lm = load_original(kind)
    cases = []
    counts = [1, 0, 1, 1, 1, 0] if kind == "anyres" else [1, 0, 2, 1, 1, 0]  # the reference can't mix tilings
    for i, n_images in enumerate(counts):
        pics = [images[(i + k) % len(images)] for k in range(n_images)]
        content = [{"type": "image"} for _ in pics] + [{"type": "text", "text": f"Case {i}: what is shown?"}]
        cases.append((lm.build_prompt([{"role": "user", "content": content}]), pics))
    n_tokens = 10
    refs = [generate_greedy(lm, prompt, pics, n_tokens) for prompt, pics in cases]
    engine = BatchEngine(lm, max_running=4, max_waiting=8).start()
    try:
        queues = []
        for prompt, pics in cases:
            q: queue.Queue = queue.Queue()
            req = Request(lm.encode(prompt, pics), SamplingParams(temperature=0, max_new_tokens=n_tokens), q.put)
            engine.submit(req)
            queues.append((req, q))
        for (req, q), ref in zip(queues, refs):
            while not q.get(timeout=60).finished:
                pass
            assert req.output_ids == ref
    finally:
        engine.shutdown()
    assert len({tuple(r) for r in refs}) > 1, "all answers equal: the comparison would prove nothing"
