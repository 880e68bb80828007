"""Chat completions: an OpenAI request becomes one chat generation on the controller, whose
frames (one stream, `index` per choice) become a completion or SSE chunks."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from llava_serve.cluster.client import Cluster, FrameSource
from llava_serve.common.aio import gather_or_cancel
from llava_serve.common.text import check_unicode
from llava_serve.errors import ErrorCode, ImageError, InvalidParameter, InvalidRequest, ServeError
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.images import ImageFetcher
from llava_serve.openai_api.sse import StreamHeader, chunk, done, error_event
from llava_serve.openai_api.tools import ToolPlan, as_text
from llava_serve.protocol.frames import FinishReason, Frame, TokenLogprob
from llava_serve.protocol.openai import (
    GUIDED_FIELDS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    Delta,
    ImagePart,
    TextPart,
    ToolCallDelta,
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
    logprobs: list[TokenLogprob] = field(default_factory=list)

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
        self.logprobs += frame.logprobs or []
        if frame.finish_reason is not None:
            self.finish_reason = frame.finish_reason.value
        return new


WORKER_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "user",  # tool results reach a template without tool turns as user text (see tools.as_text)
}


def chat_turns(messages: list[ChatMessage]) -> tuple[list[ChatTurn], list[tuple[str, str]]]:
    """Messages in the worker's chat form, and the image URLs with their `param` paths, in order."""
    turns, images = [], []
    for i, msg in enumerate(messages):
        parts: list[ChatPart] = []
        for j, part in enumerate(msg.parts()):
            if isinstance(part, ImagePart):
                images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                parts.append(ChatPart(type="image"))
            else:
                parts.append(ChatPart(type="text", text=part.text))
        turns.append(ChatTurn(role=WORKER_ROLES[msg.role], content=parts))
    return turns, images


class ChatService:
    def __init__(self, config: ApiConfig, cluster: Cluster, images: ImageFetcher) -> None:
        self.config = config
        self.cluster = cluster
        self.images = images

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        cid, stream, plan = await self.open(req, whole=True)
        choices = [ChoiceText() for _ in range(req.n)]
        async for frame in stream:
            choices[frame.index or 0].delta(frame)
        answers = [answer(i, c, plan, req.logprobs) for i, c in enumerate(choices)]
        return ChatCompletion(id=cid, model=req.model, choices=answers, usage=total_usage(choices))

    async def open_stream(self, req: ChatCompletionRequest) -> ChatStream:
        """Start the generation; refusals before the first token are raised here, as HTTP errors."""
        cid, stream, plan = await self.open(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatStream(StreamHeader(cid, int(time.time()), req.model, include_usage), stream, req.n, plan)

    async def open(self, req: ChatCompletionRequest, *, whole: bool = False) -> tuple[str, FrameSource, ToolPlan]:
        self._validate(req)
        plan = ToolPlan(req)
        messages = ([plan.system_message()] if plan.active else []) + [as_text(m) for m in req.messages]
        turns, urls = chat_turns(messages)
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
        for name, value in sampling_extensions(req, plan).items():
            setattr(body, name, value)  # set only when asked, so the worker's defaults stay its own
        return cid, await self.cluster.chat(body, whole=whole), plan

    def _validate(self, req: ChatCompletionRequest) -> None:
        try:
            req.top_logprobs_asked()
        except ValueError as exc:
            raise InvalidParameter(str(exc), param="top_logprobs") from None
        try:
            req.guided()
        except ValueError as exc:
            param = next(k for k in GUIDED_FIELDS if getattr(req, k) is not None)
            raise InvalidParameter(str(exc), param=param) from None
        unsupported = req.unsupported()
        if unsupported:
            raise InvalidRequest(f"{unsupported} is not supported by this server", param=unsupported)
        if req.n > self.config.max_n:
            raise InvalidParameter(f"n must be at most {self.config.max_n}", param="n")
        _check_text(req)
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


def _check_text(req: ChatCompletionRequest) -> None:
    """Lone surrogates are refused here: forwarding them to the worker failed (500)."""
    for i, m in enumerate(req.messages):
        for j, p in enumerate(m.parts()):
            if isinstance(p, TextPart):
                try:
                    check_unicode(p.text, f"messages[{i}].content[{j}]")
                except InvalidRequest as err:
                    err.param = f"messages[{i}].content"
                    raise


def sampling_extensions(req: ChatCompletionRequest, plan: ToolPlan) -> dict[str, Any]:
    """The worker fields for what the request asks beyond plain sampling."""
    fields: dict[str, Any] = {"max_new_tokens": req.output_limit()}
    fields |= {"presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
    fields |= {"repetition_penalty": req.repetition_penalty, "logprobs": req.top_logprobs_asked()}
    fmt = req.response_format
    if (guided := req.guided()) is not None:  # vLLM's guided_json / guided_regex / guided_choice
        fields["response_format"] = guided
    elif fmt is not None and fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else {"type": "object"}
        fields["response_format"] = {"type": "json_schema", "schema": schema}
    if (forced := plan.grammar()) is not None:
        fields["response_format"] = forced
    return {k: v for k, v in fields.items() if v is not None}


def answer(index: int, choice: ChoiceText, plan: ToolPlan, logprobs: bool | None) -> Choice:
    calls = plan.read(choice.sent) if plan.active else None
    message = AssistantMessage(content=None, tool_calls=calls) if calls else AssistantMessage(content=choice.sent)
    reason = "tool_calls" if calls else (choice.finish_reason or "stop")
    return Choice(
        index=index,
        message=message,
        finish_reason=reason,
        logprobs=ChoiceLogprobs(content=choice.logprobs) if logprobs else None,
    )


def total_usage(choices: list[ChoiceText]) -> Usage:
    """Prompt tokens counted once (the n choices share the prompt), completion tokens summed."""
    prompt = next((c.usage.get("prompt_tokens", 0) for c in choices if c.usage), 0)
    completion = sum(c.usage.get("completion_tokens", 0) for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatStream:
    """An open generation served as OpenAI SSE chunks; `aclose()` closes the upstream stream. With
    tools, each choice's answer is held back until it ends: it is then a tool call or text."""

    def __init__(self, header: StreamHeader, stream: FrameSource, n: int, plan: ToolPlan) -> None:
        self.header = header
        self.stream = stream
        self.plan = plan
        self.choices = [ChoiceText() for _ in range(n)]

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def sse(self) -> AsyncIterator[str]:
        """One string per frame (one write). The role chunks wait for the first frame and go with
        it: nothing is sent while the worker prefills (see common/streaming)."""
        roles = "".join(chunk(self.header, i, Delta(role="assistant", content="")) for i in range(len(self.choices)))
        try:
            async for frame in self.stream:
                yield roles + "".join(self._events(frame))
                roles = ""
            unfinished = [i for i, c in enumerate(self.choices) if c.finish_reason is None]  # worker sent none
            ends = [chunk(self.header, i, None, FinishReason.STOP.value) for i in unfinished]
            if self.header.include_usage:
                ends.append(chunk(self.header, None, None, usage=total_usage(self.choices)))
            yield roles + "".join(ends) + done()
        except ServeError as err:
            logger.warning("chat stream %s failed: %s", self.header.id, err.message)
            yield roles + error_event(err) + done()

    def _events(self, frame: Frame) -> list[str]:
        index = frame.index or 0
        choice = self.choices[index]
        new = choice.delta(frame)
        reason = frame.finish_reason.value if frame.finish_reason is not None else None
        logprobs = ChoiceLogprobs(content=frame.logprobs) if frame.logprobs else None
        if not self.plan.active:
            return [chunk(self.header, index, Delta(content=new) if new else None, reason, logprobs=logprobs)]
        events = [chunk(self.header, index, None, logprobs=logprobs)] if logprobs else []
        if reason is not None:
            final = answer(index, choice, self.plan, False)
            if final.message.tool_calls:
                calls = [ToolCallDelta(index=k, **c.model_dump()) for k, c in enumerate(final.message.tool_calls)]
                events.append(chunk(self.header, index, Delta(tool_calls=calls), final.finish_reason))
            else:
                events.append(chunk(self.header, index, Delta(content=choice.sent), final.finish_reason))
        return events
