"""Worker logic without HTTP: validate a request, run it on the engine, report status."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from PIL import Image

from llava_serve.common.aio import merge
from llava_serve.common.text import check_unicode
from llava_serve.engine.base import EngineBase
from llava_serve.engine.constraint import Constraint
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request, RequestOutput, TokenLogprobs
from llava_serve.errors import (
    ContextOverflow,
    ImageCountMismatch,
    ImageTooLarge,
    InvalidParameter,
    InvalidRequest,
    ShuttingDown,
)
from llava_serve.models.base import IMAGE_PLACEHOLDER, EncodedPrompt, LoadedModel
from llava_serve.models.embeddings import pooled_embeddings
from llava_serve.models.images import ImageLimits, decode_request_images, encode_image_base64
from llava_serve.protocol.frames import FinishReason, Frame, TokenLogprob, TopLogprob, Usage
from llava_serve.protocol.worker import ChatRequest, ChatTurn, GenerateRequest, SamplingFields, WorkerStatus
from llava_serve.worker.messages import TextGuard, checked_messages, special_tokens_of
from llava_serve.worker.metrics import WorkerMetrics
from llava_serve.worker.stream import OutputChannel

# Tokenizing costs time and memory in proportion to the text (a 50 MB prompt: minutes and GBs), so a
# prompt too long to fit is refused before it: no real prompt averages this many characters a token.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class Accepted:
    request: Request
    channel: OutputChannel
    echo: str  # what each frame's text starts with: the prompt (LLaVA's echo) or nothing
    index: int | None = None  # the choice, on a chat stream
    trim: tuple[str, ...] = ()  # trimmed from the end of the final text, never a stop (see accept)
    logprobs_sent: int = 0  # token log-probabilities already sent in earlier frames


class WorkerService:
    def __init__(self, lm: LoadedModel, engine: EngineBase, limits: ImageLimits, metrics: WorkerMetrics) -> None:
        self.lm = lm
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.draining = False
        self.guard = TextGuard(special_tokens_of(lm.tokenizer))
        # CPU-bound preprocessing (image decode, tokenizer) stays off the event loop, bounded.
        self._prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llava-serve-prep")

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

    async def accept(self, body: GenerateRequest) -> list[Accepted]:
        """Validate and submit (n choices of one prompt); raises a typed error (4xx/429/503) before
        any token exists."""
        self._check_open()
        encoded = await self._off_loop(self.encode, body.prompt, body.images or [])
        # LLaVA's clients send their template's separator as `stop` (" " for vicuna_v1) and LLaVA's
        # worker only trims it from the end of the answer; a stop at the first space would end every
        # answer after one word. So on this route a whitespace-only stop is trimmed, not a stop.
        soft = tuple(s for s in body.stop_list() if not s.strip())
        if soft:
            body = body.model_copy(update={"stop": [s for s in body.stop_list() if s.strip()]})
        constraints = await self._off_loop(self.constraints, body, body.n)
        accepted = self._submit_all(encoded, body, body.prompt if body.echo else "", constraints)
        for a in accepted:
            a.trim = soft
        return accepted

    async def accept_chat(self, body: ChatRequest) -> list[Accepted]:
        """Render the messages with the model's template, encode the images once, submit `n` choices."""
        self._check_open()
        if "max_new_tokens" in body.model_fields_set and body.max_new_tokens > self.lm.context_length:
            raise InvalidParameter(
                f"max_tokens {body.max_new_tokens} exceeds the model's context of {self.lm.context_length}",
                param="max_tokens",
            )
        prompt = await self._off_loop(self.render, body.messages)
        encoded = await self._off_loop(self.encode, prompt, body.images)
        constraints = await self._off_loop(self.constraints, body, body.n)
        return self._submit_all(encoded, body, "", constraints)

    async def build_prompt(self, messages: list[ChatTurn]) -> str:
        return await self._off_loop(self.render, messages)

    async def count_tokens(self, body: GenerateRequest) -> int:
        """The prompt's length in tokens, image tokens included (the same checks as a generation).
        FastChat's API server sends the prompt alone: each `<image>` then counts as a blank image of
        the vision tower's size (an anyres model may count a real image of another shape otherwise)."""
        images = body.images or []
        if not images and self.lm.is_multimodal:
            images = [blank_image(self.lm)] * body.prompt.count(IMAGE_PLACEHOLDER)
        encoded = await self._off_loop(self.encode, body.prompt, images)
        return len(encoded.input_ids)

    async def embeddings(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """FastChat's embeddings of `texts` and their token count; the forward pass runs on the
        engine's thread, between steps."""
        self._check_open()
        ids = await self._off_loop(self._tokenize, texts)
        future = self.engine.run_on_engine_thread(lambda: pooled_embeddings(self.lm, ids))
        return await asyncio.wrap_future(future), sum(len(i) for i in ids)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        ids = []
        for i, text in enumerate(texts):
            if len(text) > self.lm.context_length * MAX_CHARS_PER_TOKEN or not text:
                raise InvalidRequest(f"input {i} is empty or too long for the context", param="input")
            ids.append(list(self.lm.tokenizer(text).input_ids))
            if len(ids[-1]) > self.lm.context_length:
                raise ContextOverflow(
                    f"input {i} is {len(ids[-1])} tokens; the context is {self.lm.context_length}", param="input"
                )
        return ids

    def render(self, messages: list[ChatTurn]) -> str:
        """The model's own template over the messages; user text cannot become special tokens."""
        checked = checked_messages([m.as_message() for m in messages], self.guard)
        try:
            return self.lm.build_prompt(checked)
        except TemplateError as exc:  # the model's chat template refuses these messages
            raise InvalidRequest(f"the model's chat template cannot render these messages: {exc}") from None

    def encode(self, prompt: str, images: list[str]) -> EncodedPrompt:
        """Check the images and prompt against the limits, then decode and encode them."""
        if len(images) > self.limits.max_count:
            raise ImageTooLarge(f"{len(images)} images sent; this worker accepts at most {self.limits.max_count}")
        tags = prompt.count("<image>")
        if tags > self.limits.max_count:
            raise InvalidRequest(f"the prompt has {tags} <image> tags; at most {self.limits.max_count} allowed")
        if tags != len(images):  # before any decoding: the cheapest refusal first
            raise ImageCountMismatch(
                f"the prompt has {tags} <image> placeholder(s) but {len(images)} image(s) were sent; "
                "send exactly one image per <image>"
            )
        most = self.lm.context_length * MAX_CHARS_PER_TOKEN
        if len(prompt) > most:
            raise ContextOverflow(
                f"the prompt is {len(prompt)} characters; more than {most} cannot fit in the context of "
                f"{self.lm.context_length} tokens; shorten the prompt"
            )
        check_unicode(prompt, "prompt")  # tokenizers fail on lone surrogates
        decoded = decode_request_images(images, self.limits)
        return self.lm.encode(prompt, [d.image for d in decoded], [d.sha256 for d in decoded])

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

    async def frames(self, accepted: list[Accepted]) -> AsyncIterator[Frame]:
        """The frames of one or several choices, interleaved as they come."""

        async def of(a: Accepted) -> AsyncIterator[Frame]:
            async for out in self.outputs(a):
                yield frame_of(a, out, self.token_text)

        if len(accepted) == 1:
            async for f in of(accepted[0]):
                yield f
            return
        async for f in merge([of(a) for a in accepted]):
            yield f

    def abort(self, accepted: list[Accepted]) -> None:
        for a in accepted:
            self.engine.abort(a.request)

    def token_text(self, token: int) -> str:
        return str(self.lm.tokenizer.decode([token]))

    def status(self) -> WorkerStatus:
        return WorkerStatus(model_names=[self.lm.name], speed=1, queue_length=self.engine.queue_length())

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDown("worker is shutting down; retry on another worker")

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    def constraints(self, body: SamplingFields, n: int) -> list[Constraint | None]:
        """Each choice's grammar matcher (compiled here, off the event loop and the engine thread)."""
        spec = body.response_format
        if spec is None or spec.get("type") == "text":
            return [None] * n
        return [Constraint(spec, self.lm.tokenizer) for _ in range(n)]

    def _submit_all(
        self, encoded: EncodedPrompt, body: SamplingFields, echo: str, constraints: list[Constraint | None]
    ) -> list[Accepted]:
        """n choices of one encoded prompt (choice i samples with seed + i), all or none."""
        n, accepted = len(constraints), []
        try:
            for i, constraint in enumerate(constraints):
                accepted.append(self._submit(encoded, body, echo, i if n > 1 else None, i, constraint))
        except BaseException:  # the ones already in are given back
            self.abort(accepted)
            raise
        return accepted

    def _submit(
        self,
        encoded: EncodedPrompt,
        body: SamplingFields,
        echo: str,
        index: int | None,
        seed_offset: int,
        constraint: Constraint | None,
    ) -> Accepted:
        channel = OutputChannel()

        def sink(out: RequestOutput) -> None:  # engine thread; counted here, read or not
            if out.finished:
                self.metrics.finished(out.finish_reason or "unknown")
            channel.sink(out)

        request = Request(prompt=encoded, params=sampling_params(body, seed_offset), sink=sink)
        request.constraint = constraint
        if body.request_id:
            request.request_id = body.request_id if index is None else f"{body.request_id}-{index}"
        self.engine.submit(request)
        self.metrics.accepted()
        return Accepted(request, channel, echo, index)


@functools.cache
def _blank(width: int, height: int) -> str:
    return encode_image_base64(Image.new("RGB", (width, height)))


def blank_image(lm: LoadedModel) -> str:
    """A black image (base64) of the vision tower's input size."""
    size = getattr(getattr(lm.model.config, "vision_config", None), "image_size", 336)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return _blank(int(width), int(height))


def sampling_params(body: SamplingFields, seed_offset: int = 0) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=None if body.seed is None else body.seed + seed_offset,  # n choices, each reproducible
        max_new_tokens=body.max_new_tokens,
        stop=tuple(body.stop_list()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=body.logprobs,
    )


def frame_of(accepted: Accepted, out: RequestOutput, token_text: Callable[[int], str]) -> Frame:
    """A frame for an engine output. `usage` is in every frame, as FastChat's workers send it: a
    frame can carry several tokens (text held back mid-character or mid-stop-string)."""
    frame = _frame_of(accepted, out)
    if out.logprobs is not None:
        new = out.logprobs[accepted.logprobs_sent : out.completion_tokens]
        accepted.logprobs_sent += len(new)
        frame.logprobs = [_token_logprob(t, token_text) for t in new]
    return frame


def _token_logprob(t: TokenLogprobs, token_text: Callable[[int], str]) -> TokenLogprob:
    def top(token: int, logprob: float) -> TopLogprob:
        text = token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return TokenLogprob(**top(t.token, t.logprob).model_dump(), top_logprobs=[top(i, lp) for i, lp in t.top])


def _frame_of(accepted: Accepted, out: RequestOutput) -> Frame:
    text = accepted.echo + out.text
    if out.finished:
        for soft in accepted.trim:
            text = text.removesuffix(soft)
    usage = Usage.of(out.prompt_tokens, out.completion_tokens)
    reason = FinishReason(out.finish_reason) if out.finished and out.finish_reason else None
    if out.error is not None:
        return out.error.frame(partial_text=text, usage=usage, finish_reason=reason, index=accepted.index)
    return Frame(text=text, usage=usage, finish_reason=reason, index=accepted.index)
