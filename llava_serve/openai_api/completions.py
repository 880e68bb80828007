"""Legacy completions: a raw prompt (no chat template) becomes one generation per prompt on the
controller's /worker_generate_stream, `n` choices each; images (an extension) fill `<image>`s."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from llava_serve.cluster.client import Cluster, FrameSource
from llava_serve.common.aio import aclose_shielded, gather_or_cancel, merge
from llava_serve.errors import ImageError, InvalidParameter, InvalidRequest, ServeError
from llava_serve.openai_api.config import ApiConfig
from llava_serve.openai_api.images import ImageFetcher
from llava_serve.openai_api.serving import ChoiceText, total_usage
from llava_serve.openai_api.sse import StreamHeader, done, error_event
from llava_serve.protocol.frames import Frame
from llava_serve.protocol.openai import Completion, CompletionChoice, CompletionRequest
from llava_serve.protocol.worker import GenerateRequest

logger = logging.getLogger(__name__)


class CompletionService:
    def __init__(self, config: ApiConfig, cluster: Cluster, images: ImageFetcher) -> None:
        self.config, self.cluster, self.images = config, cluster, images

    async def complete(self, req: CompletionRequest) -> Completion:
        cid, streams = await self.open(req, whole=True)
        choices = [ChoiceText(strip_leading=False) for _ in range(len(streams) * req.n)]
        async for index, frame in merge([indexed(p, req.n, s) for p, s in enumerate(streams)]):
            choices[index].delta(frame)
        answers = [CompletionChoice(index=i, text=c.sent, finish_reason=c.finish_reason or "stop")
                   for i, c in enumerate(choices)]  # fmt: skip
        return Completion(id=cid, model=req.model, choices=answers, usage=total_usage(choices))

    async def open_stream(self, req: CompletionRequest) -> CompletionStream:
        cid, streams = await self.open(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return CompletionStream(StreamHeader(cid, int(time.time()), req.model, include_usage), streams, req.n)

    async def open(self, req: CompletionRequest, *, whole: bool = False) -> tuple[str, list[FrameSource]]:
        self._validate(req)
        images = await gather_or_cancel([self._image(url, i) for i, url in enumerate(req.images)])
        cid = f"cmpl-{uuid.uuid4().hex}"
        streams: list[FrameSource] = []
        try:
            for i, prompt in enumerate(req.prompts()):
                body = GenerateRequest(
                    prompt=prompt,
                    images=images,
                    echo=req.echo,
                    n=req.n,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    max_new_tokens=req.max_tokens or 16,
                    stop=req.stop,
                    seed=req.seed,
                    request_id=f"{cid}-{i}",
                )
                streams.append(await self.cluster.generate(body, req.model, whole=whole))
        except BaseException:
            await aclose_shielded(*streams)
            raise
        return cid, streams

    def _validate(self, req: CompletionRequest) -> None:
        if (unsupported := req.unsupported()) is not None:
            raise InvalidRequest(f"{unsupported} is not supported by this server", param=unsupported)
        if req.n * len(req.prompts()) > self.config.max_n:
            raise InvalidParameter(f"n times the number of prompts must be at most {self.config.max_n}", param="n")
        if len(req.images) > self.config.max_images_per_request:
            raise InvalidParameter(f"at most {self.config.max_images_per_request} images", param="images")

    async def _image(self, url: str, i: int) -> str:
        if not url.strip():
            raise ImageError(f"images[{i}] is empty", param=f"images[{i}]")
        try:
            return await self.images.to_base64(url)
        except ServeError as err:
            err.param = f"images[{i}]"
            raise


async def indexed(prompt: int, n: int, stream: FrameSource) -> AsyncIterator[tuple[int, Frame]]:
    """Frames of one prompt's stream, each with its choice's place among all prompts' choices."""
    async for frame in stream:
        yield prompt * n + (frame.index or 0), frame


class CompletionStream:
    def __init__(self, header: StreamHeader, streams: list[FrameSource], n: int) -> None:
        self.header, self.streams, self.n = header, streams, n
        self.choices = [ChoiceText(strip_leading=False) for _ in range(len(streams) * n)]

    async def aclose(self) -> None:
        await aclose_shielded(*self.streams)

    async def sse(self) -> AsyncIterator[str]:
        try:
            async for index, frame in merge([indexed(p, self.n, s) for p, s in enumerate(self.streams)]):
                new = self.choices[index].delta(frame)
                reason = frame.finish_reason.value if frame.finish_reason is not None else None
                if new or reason:
                    yield self._chunk([CompletionChoice(index=index, text=new, finish_reason=reason)])
            if self.header.include_usage:
                yield self._chunk([], usage=True)
        except ServeError as err:
            logger.warning("completion stream %s failed: %s", self.header.id, err.message)
            yield error_event(err)
        yield done()

    def _chunk(self, choices: list[CompletionChoice], usage: bool = False) -> str:
        h = self.header
        data = Completion(id=h.id, created=h.created, model=h.model, choices=choices).model_dump()
        data["usage"] = total_usage(self.choices).model_dump() if usage else None
        if not h.include_usage:
            del data["usage"]
        return f"data: {json.dumps(data)}\n\n"
