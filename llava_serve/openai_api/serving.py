"""Chat completions: OpenAI request -> worker prompt and images -> n generations -> response.

The API does not know a model's chat template: a worker of the model builds the prompt
(`/worker_build_prompt`); generations go through the controller, which picks the worker.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from llava_serve.common.aio import aclose_shielded, gather_or_cancel, merge
from llava_serve.common.frames import iter_frames
from llava_serve.common.text import check_unicode
from llava_serve.errors import (
    ErrorCode,
    ImageError,
    InvalidParameter,
    InvalidRequest,
    ServeError,
    WorkerUnavailable,
)
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.errors import ControllerUnavailable, error_from_code, with_param
from llava_serve.openai_api.images import ImageFetcher
from llava_serve.openai_api.sse import StreamHeader, chunk, done, error_event
from llava_serve.openai_api.upstream import Upstream
from llava_serve.protocol.openai import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Delta,
    ImagePart,
    TextPart,
    Usage,
)

logger = logging.getLogger(__name__)
PROMPT_TRIES = 3


@dataclass
class Update:
    """One frame of one choice, as a text delta."""

    index: int
    delta: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass
class Prepared:
    id: str
    bodies: list[dict[str, Any]]  # one generation request per choice


def worker_messages(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Messages in the worker's prompt-building form, and the image URLs with their `param` paths."""
    messages, images = [], []
    for i, msg in enumerate(req.messages):
        content: list[dict[str, str]] = []
        for j, part in enumerate(msg.parts()):
            if isinstance(part, ImagePart):
                images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part.text})
        role = "system" if msg.role == "developer" else msg.role
        messages.append({"role": role, "content": content})
    return messages, images


class ChatService:
    def __init__(self, config: ApiConfig, upstream: Upstream, images: ImageFetcher) -> None:
        self.config = config
        self.upstream = upstream
        self.images = images

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        prep = await self.prepare(req)
        results = await gather_or_cancel([self._collect(i, body) for i, body in enumerate(prep.bodies)])
        choices = [
            Choice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
            for i, (text, reason, _) in enumerate(results)
        ]
        return ChatCompletion(id=prep.id, model=req.model, choices=choices, usage=total_usage(r[2] for r in results))

    async def open_stream(self, req: ChatCompletionRequest) -> ChatStream:
        """Start the generations; refusals before the first token are raised here, as HTTP errors."""
        prep = await self.prepare(req)
        responses: list[httpx.Response] = []
        try:
            for body in prep.bodies:
                responses.append(await self.upstream.open_generation(body))
        except BaseException:
            await aclose_shielded(*responses)
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatStream(prep.id, req.model, responses, include_usage)

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        self._validate(req)
        messages, image_urls = worker_messages(req)
        images = await gather_or_cancel([self._image(url, param) for url, param in image_urls])
        address, prompt = await self._build_prompt(req.model, messages)
        if prompt.count("<image>") != len(images):
            raise ServeError(
                f"worker {address} built a prompt with {prompt.count('<image>')} image "
                f"placeholders for {len(images)} images"
            )
        limit = req.output_limit()
        if limit is not None and limit > (context := await self.upstream.context_length(req.model, address)):
            raise with_param(
                InvalidParameter(f"max_tokens {limit} exceeds the model's context of {context}"), "max_tokens"
            )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return Prepared(rid, [self._body(req, prompt, images, rid, i) for i in range(req.n)])

    async def _build_prompt(self, model: str, messages: list[dict[str, Any]]) -> tuple[str, str]:
        """A worker of `model` builds the prompt; an unreachable one (the controller has not
        noticed yet) is passed over for the next address the controller gives."""
        for attempt in range(PROMPT_TRIES):
            address = await self.upstream.worker_for(model)
            try:
                return address, await self.upstream.build_prompt(address, messages)
            except WorkerUnavailable as err:
                if attempt == PROMPT_TRIES - 1:
                    raise
                logger.warning("building the prompt on %s failed (%s); asking for another worker", address, err)
        raise AssertionError("unreachable")

    def _validate(self, req: ChatCompletionRequest) -> None:
        unsupported = req.unsupported()
        if unsupported:
            raise with_param(InvalidRequest(f"{unsupported} is not supported by this server"), unsupported)
        if req.n > self.config.max_n:
            raise with_param(InvalidParameter(f"n must be at most {self.config.max_n}"), "n")
        _check_text(req)
        n_images = sum(isinstance(p, ImagePart) for m in req.messages for p in m.parts())
        if n_images > self.config.max_images_per_request:
            raise with_param(
                InvalidRequest(
                    f"{n_images} images in one request; this server takes at most {self.config.max_images_per_request}",
                    code=ErrorCode.REQUEST_TOO_LARGE,
                ),
                "messages",
            )

    async def _image(self, url: str, param: str) -> str:
        if not url.strip():
            raise with_param(ImageError("image_url.url is empty: the image is missing"), param)
        try:
            return await self.images.to_base64(url)
        except ServeError as err:
            raise with_param(err, param) from None

    @staticmethod
    def _body(req: ChatCompletionRequest, prompt: str, images: list[str], rid: str, i: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": req.model,
            "prompt": prompt,
            "images": images,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "stop": req.stop,
            "seed": None if req.seed is None else req.seed + i,  # n samples, each reproducible
            "echo": False,
            "request_id": f"{rid}-{i}",
        }
        if req.output_limit() is not None:
            body["max_new_tokens"] = req.output_limit()
        return body

    async def _collect(self, index: int, body: dict[str, Any]) -> tuple[str, str, dict[str, int] | None]:
        resp = await self.upstream.open_generation(body)
        text, finish, usage = "", "stop", None
        async for update in choice_updates(index, resp):
            text += update.delta
            finish = update.finish_reason or finish
            usage = update.usage or usage
        return text, finish, usage


def _check_text(req: ChatCompletionRequest) -> None:
    """Lone surrogates are refused here: forwarding them to the worker failed (500)."""
    for i, m in enumerate(req.messages):
        for j, p in enumerate(m.parts()):
            if isinstance(p, TextPart):
                try:
                    check_unicode(p.text, f"messages[{i}].content[{j}]")
                except InvalidRequest as err:
                    raise with_param(err, f"messages[{i}].content") from None


async def choice_updates(index: int, resp: httpx.Response) -> AsyncIterator[Update]:
    """Frames of one generation as deltas; a frame with an error_code raises its typed error."""
    sent = ""
    try:
        async for frame in iter_frames(resp.aiter_bytes()):
            code, text = int(frame.get("error_code", 0)), str(frame.get("text", ""))
            finish = frame.get("finish_reason")
            if code or finish in ("error", "abort"):
                raise error_from_code(code or ErrorCode.INTERNAL_ERROR, text or f"generation ended: {finish}")
            # The answer starts after "ASSISTANT:"; a byte-level tokenizer puts the space in the first
            # token. Leading whitespace is dropped (as LLaVA's demo strips its output); the cumulative
            # text stays consistent because lstrip of a growing text only grows.
            text = text.lstrip()
            # Cumulative text: send what is new (text that shrank is held back until it grows past).
            delta = text[len(sent) :] if text.startswith(sent) else ""
            sent += delta
            yield Update(index, delta, finish, frame.get("usage"))
            if finish:
                return
        yield Update(index, "", "stop")  # a worker that does not send finish_reason
    except httpx.HTTPError as exc:
        raise ControllerUnavailable(f"lost the generation stream from the controller: {exc!r}") from None
    except ValueError as exc:  # a frame that is not a JSON object
        raise WorkerUnavailable(f"invalid frame in the generation stream: {exc}") from None
    finally:
        await aclose_shielded(resp)


def total_usage(usages: Any) -> Usage:
    """Prompt tokens counted once (the n choices share the prompt), completion tokens summed."""
    usages = [u for u in usages if u]
    prompt = usages[0].get("prompt_tokens", 0) if usages else 0
    completion = sum(u.get("completion_tokens", 0) for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatStream:
    """Open generations, served as OpenAI SSE chunks; `aclose()` closes every upstream stream."""

    def __init__(self, cid: str, model: str, responses: list[httpx.Response], include_usage: bool) -> None:
        self.header = StreamHeader(cid, int(time.time()), model, include_usage)
        self.responses = responses

    async def aclose(self) -> None:
        await aclose_shielded(*self.responses)

    async def sse(self) -> AsyncIterator[str]:
        usages: dict[int, dict[str, int]] = {}
        try:
            for i in range(len(self.responses)):
                yield chunk(self.header, i, Delta(role="assistant", content=""))
            async for u in merge([choice_updates(i, r) for i, r in enumerate(self.responses)]):
                if u.usage:
                    usages[u.index] = u.usage
                if u.delta or u.finish_reason:
                    yield chunk(self.header, u.index, Delta(content=u.delta) if u.delta else None, u.finish_reason)
            if self.header.include_usage:
                yield chunk(self.header, None, None, usage=total_usage(usages.values()))
        except ServeError as err:
            logger.warning("chat stream %s failed: %s", self.header.id, err.message)
            yield error_event(err)
        yield done()
