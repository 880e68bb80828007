"""Worker logic without HTTP: validate a request, run it on the engine, report status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from llava_serve.common.text import check_unicode
from llava_serve.engine.base import EngineBase
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request, RequestOutput
from llava_serve.errors import ContextOverflow, ImageCountMismatch, ImageTooLarge, InvalidRequest, ShuttingDown
from llava_serve.models.base import LoadedModel
from llava_serve.models.images import ImageLimits, decode_request_images
from llava_serve.protocol.worker import GenerateRequest
from llava_serve.worker.metrics import WorkerMetrics
from llava_serve.worker.stream import OutputChannel

# Tokenizing costs time and memory in proportion to the text (a 50 MB prompt: minutes and GBs), so a
# prompt too long to fit is refused before it: no real prompt averages this many characters a token.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class Accepted:
    request: Request
    channel: OutputChannel
    body: GenerateRequest


class WorkerService:
    def __init__(self, lm: LoadedModel, engine: EngineBase, limits: ImageLimits, metrics: WorkerMetrics) -> None:
        self.lm = lm
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.draining = False
        # CPU-bound preprocessing (image decode, tokenizer) stays off the event loop, bounded.
        self._prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llava-serve-prep")

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

    async def accept(self, body: GenerateRequest) -> Accepted:
        """Validate and submit; raises a typed error (4xx/429/503) before any token exists."""
        if self.draining:
            raise ShuttingDown("worker is shutting down; retry on another worker")
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self._prep, self.encode, body)
        params = SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            max_new_tokens=body.max_new_tokens,
            stop=tuple(body.stop_list()),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
        )
        channel = OutputChannel()

        def sink(out: RequestOutput) -> None:  # engine thread; counted here, read or not
            if out.finished:
                self.metrics.finished(out.finish_reason or "unknown")
            channel.sink(out)

        request = Request(prompt=encoded, params=params, sink=sink)
        if body.request_id:
            request.request_id = body.request_id
        self.engine.submit(request)
        self.metrics.accepted()
        return Accepted(request, channel, body)

    async def count_tokens(self, body: GenerateRequest) -> int:
        """The prompt's length in tokens, image tokens included (the same checks as a generation)."""
        encoded = await asyncio.get_running_loop().run_in_executor(self._prep, self.encode, body)
        return len(encoded.input_ids)

    def encode(self, body: GenerateRequest) -> Any:
        """Check the request's images and prompt against the limits, then decode and encode them."""
        images = body.images or []
        if len(images) > self.limits.max_count:
            raise ImageTooLarge(f"{len(images)} images sent; this worker accepts at most {self.limits.max_count}")
        tags = body.prompt.count("<image>")
        if tags > self.limits.max_count:
            raise InvalidRequest(f"the prompt has {tags} <image> tags; at most {self.limits.max_count} allowed")
        if tags != len(images):  # before any decoding: the cheapest refusal first
            raise ImageCountMismatch(
                f"the prompt has {tags} <image> placeholder(s) but {len(images)} image(s) were sent; "
                "send exactly one image per <image>"
            )
        most = self.lm.context_length * MAX_CHARS_PER_TOKEN
        if len(body.prompt) > most:
            raise ContextOverflow(
                f"the prompt is {len(body.prompt)} characters; more than {most} cannot fit in the context of "
                f"{self.lm.context_length} tokens; shorten the prompt"
            )
        check_unicode(body.prompt, "prompt")  # tokenizers fail on lone surrogates
        decoded = decode_request_images(images, self.limits)
        return self.lm.encode(body.prompt, [d.image for d in decoded], [d.sha256 for d in decoded])

    async def outputs(self, accepted: Accepted) -> AsyncIterator[RequestOutput]:
        """The request's outputs; leaving early (disconnect, error) cancels it in the engine."""
        finished = False
        try:
            async for out in self.metrics.timed(accepted.channel):
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(accepted.request)

    def status(self) -> dict[str, Any]:
        return {"model_names": [self.lm.name], "speed": 1, "queue_length": self.engine.queue_length()}

    def frame(self, accepted: Accepted, out: RequestOutput) -> dict[str, Any]:
        text = accepted.body.prompt + out.text if accepted.body.echo else out.text
        obj: dict[str, Any] = {"text": text, "error_code": 0}
        if out.error is not None:
            obj = {**out.error.to_dict(), "partial_text": text}
        # usage in every frame, as FastChat's workers send it: a frame can carry several tokens
        # (text held back mid-character or mid-stop-string), and clients can tell how many
        obj["usage"] = {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
        }
        if out.finished:
            obj["finish_reason"] = out.finish_reason
        return obj
