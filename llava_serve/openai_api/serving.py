"""Chat completions: an OpenAI request becomes one chat generation on the controller, whose
frames (one stream, `index` per choice) become a completion or SSE chunks."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llava_serve.cluster.client import ClusterClient, FrameStream
from llava_serve.common.aio import gather_or_cancel
from llava_serve.errors import ErrorCode, ImageError, InvalidParameter, InvalidRequest, ServeError
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.images import ImageFetcher
from llava_serve.openai_api.sse import StreamHeader, chunk, done, error_event
from llava_serve.protocol.frames import FinishReason, Frame
from llava_serve.protocol.openai import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Delta,
    ImagePart,
    Usage,
)
from llava_serve.protocol.worker import ChatPart, ChatRequest, ChatTurn

logger = logging.getLogger(__name__)


@dataclass
class ChoiceText:
    """One choice's answer as it grows: frames carry the cumulative text, chunks the new part."""

    strip_leading: bool = True
    sent: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)

    def delta(self, frame: Frame) -> str:
        # A chat answer starts after the template's "ASSISTANT:"; a byte-level tokenizer puts the space
        # in the first token. Leading whitespace is dropped there (as LLaVA's demo strips its output);
        # lstrip of a growing text only grows, and text that shrank is held back until it grows past.
        # A raw completion keeps its text as generated.
        text = frame.text.lstrip() if self.strip_leading else frame.text
        new = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += new
        if frame.usage is not None:
            self.usage = frame.usage.model_dump()
        if frame.finish_reason is not None:
            self.finish_reason = frame.finish_reason.value
        return new


def chat_turns(req: ChatCompletionRequest) -> tuple[list[ChatTurn], list[tuple[str, str]]]:
    """Messages in the worker's chat form, and the image URLs with their `param` paths, in order."""
    turns, images = [], []
    for i, msg in enumerate(req.messages):
        parts: list[ChatPart] = []
        for j, part in enumerate(msg.parts()):
            if isinstance(part, ImagePart):
                images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                parts.append(ChatPart(type="image"))
            else:
                parts.append(ChatPart(type="text", text=part.text))
        role = "system" if msg.role == "developer" else msg.role
        turns.append(ChatTurn(role=role, content=parts))
    return turns, images


class ChatService:
    def __init__(self, config: ApiConfig, cluster: ClusterClient, images: ImageFetcher) -> None:
        self.config = config
        self.cluster = cluster
        self.images = images

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        cid, stream = await self.open(req)
        choices = [ChoiceText() for _ in range(req.n)]
        async for frame in stream:
            choices[frame.index or 0].delta(frame)
        answers = [
            Choice(index=i, message=AssistantMessage(content=c.sent), finish_reason=c.finish_reason or "stop")
            for i, c in enumerate(choices)
        ]
        return ChatCompletion(id=cid, model=req.model, choices=answers, usage=total_usage(choices))

    async def open_stream(self, req: ChatCompletionRequest) -> ChatStream:
        """Start the generation; refusals before the first token are raised here, as HTTP errors."""
        cid, stream = await self.open(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatStream(StreamHeader(cid, int(time.time()), req.model, include_usage), stream, req.n)

    async def open(self, req: ChatCompletionRequest) -> tuple[str, FrameStream]:
        self._validate(req)
        turns, urls = chat_turns(req)
        images = await gather_or_cancel([self._image(url, param) for url, param in urls])
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        body = ChatRequest(
            model=req.model,
            messages=turns,
            images=images,
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stop,
            seed=req.seed,
            request_id=cid,
        )
        if (limit := req.output_limit()) is not None:
            body.max_new_tokens = limit
        return cid, await self.cluster.chat(body)

    def _validate(self, req: ChatCompletionRequest) -> None:
        unsupported = req.unsupported()
        if unsupported:
            raise InvalidRequest(f"{unsupported} is not supported by this server", param=unsupported)
        if req.n > self.config.max_n:
            raise InvalidParameter(f"n must be at most {self.config.max_n}", param="n")
        n_images = sum(isinstance(p, ImagePart) for m in req.messages for p in m.parts())
        if n_images > self.config.max_images_per_request:
            raise InvalidRequest(
                f"{n_images} images in one request; this server takes at most {self.config.max_images_per_request}",
                code=ErrorCode.REQUEST_TOO_LARGE,
                param="messages",
            )

    async def _image(self, url: str, param: str) -> str:
        if not url.strip():
            raise ImageError("image_url.url is empty: the image is missing", param=param)
        try:
            return await self.images.to_base64(url)
        except ServeError as err:
            err.param = param
            raise


def total_usage(choices: list[ChoiceText]) -> Usage:
    """Prompt tokens counted once (the n choices share the prompt), completion tokens summed."""
    prompt = next((c.usage.get("prompt_tokens", 0) for c in choices if c.usage), 0)
    completion = sum(c.usage.get("completion_tokens", 0) for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatStream:
    """An open generation served as OpenAI SSE chunks; `aclose()` closes the upstream stream."""

    def __init__(self, header: StreamHeader, stream: FrameStream, n: int) -> None:
        self.header = header
        self.stream = stream
        self.choices = [ChoiceText() for _ in range(n)]

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def sse(self) -> AsyncIterator[str]:
        try:
            for i in range(len(self.choices)):
                yield chunk(self.header, i, Delta(role="assistant", content=""))
            async for frame in self.stream:
                index = frame.index or 0
                new = self.choices[index].delta(frame)
                reason = frame.finish_reason.value if frame.finish_reason is not None else None
                if new or reason:
                    yield chunk(self.header, index, Delta(content=new) if new else None, reason)
            for i, c in enumerate(self.choices):  # a worker that ends without finish_reason
                if c.finish_reason is None:
                    yield chunk(self.header, i, None, FinishReason.STOP.value)
            if self.header.include_usage:
                yield chunk(self.header, None, None, usage=total_usage(self.choices))
        except ServeError as err:
            logger.warning("chat stream %s failed: %s", self.header.id, err.message)
            yield error_event(err)
        yield done()
