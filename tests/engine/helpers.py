"""Engine test helpers: drive an engine synchronously and compute references with model.generate."""

from __future__ import annotations

import hashlib
import queue
from dataclasses import dataclass, field

import torch
from PIL import Image

from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request, RequestOutput
from llava_serve.models.base import LoadedModel


@dataclass
class Case:
    prompt: str
    images: list[Image.Image] = field(default_factory=list)

    def keys(self) -> list[str]:
        return [hashlib.sha256(img.tobytes() + bytes(img.size)).hexdigest() for img in self.images]


def make_cases(lm: LoadedModel, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        n_images = 0 if (i % 5 == 4 or not lm.is_multimodal) else 1 + (i % 7 == 0)
        colours = [((37 * i + 50 * k) % 256, (91 * i) % 256, (53 * i + 17 * k) % 256) for k in range(n_images)]
        images = [Image.new("RGB", (24 + 7 * i, 40 + 3 * k), c) for k, c in enumerate(colours)]
        question = f"Question {i}: " + "what is in this picture? " * (i % 4)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        cases.append(Case(lm.build_prompt([{"role": "user", "content": content}]), images))
    return cases


def reference(lm: LoadedModel, case: Case, max_new_tokens: int) -> list[int]:
    """Greedy tokens from plain transformers model.generate for this request alone."""
    if lm.processor is not None:
        inputs = lm.processor(text=case.prompt, images=case.images or None, return_tensors="pt")
    else:
        inputs = lm.tokenizer(case.prompt, return_tensors="pt")
    with torch.inference_mode():
        out = lm.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


class Collector:
    """A request plus everything the engine sent for it."""

    def __init__(self, lm: LoadedModel, case: Case, params: SamplingParams) -> None:
        self.outputs: queue.Queue[RequestOutput] = queue.Queue()
        self.seen: list[RequestOutput] = []
        self.request = Request(
            prompt=lm.encode(case.prompt, case.images, case.keys()), params=params, sink=self.outputs.put
        )

    def next(self, timeout: float = 60) -> RequestOutput:
        out = self.outputs.get(timeout=timeout)
        self.seen.append(out)
        return out

    def wait(self, timeout: float = 120) -> RequestOutput:
        while True:
            out = self.next(timeout)
            if out.finished:
                return out


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True, **kw)
