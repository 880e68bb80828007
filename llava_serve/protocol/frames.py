"""The worker stream (SPEC 3): typed frames, each JSON then a NUL byte. The one codec of that wire.

Every sender builds a `Frame` and writes it with `encode_frame`; every reader gets `Frame`s back from
`iter_frames` (async), `iter_frames_sync` or `decode_frame`. An error frame's `text` keeps the
`"message (error_code: N)"` form LLaVA's and FastChat's clients show; its `message` carries the
message alone, so no reader has to take the text apart again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from enum import Enum

from pydantic import BaseModel, ConfigDict, ValidationError

NUL = b"\0"


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class TopLogprob(BaseModel):
    """A token and its log-probability, in OpenAI's shape (`bytes`: the token's UTF-8 bytes)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class Frame(BaseModel):
    """One frame. Workers of other projects send frames with fewer keys (LLaVA's: text and
    error_code only) or more; those are read as well."""

    model_config = ConfigDict(extra="ignore", use_enum_values=False)

    text: str = ""
    error_code: int = 0
    usage: Usage | None = None
    finish_reason: FinishReason | None = None
    index: int | None = None  # the choice, on a stream that carries several (n > 1)
    message: str | None = None  # error frames: the message without the code
    param: str | None = None  # error frames: the request field at fault
    partial_text: str | None = None  # error frames ending a stream: the text sent before the failure
    logprobs: list[TokenLogprob] | None = None  # the tokens generated since the previous frame of this choice

    @classmethod
    def failure(
        cls,
        code: int,
        message: str,
        *,
        param: str | None = None,
        finish_reason: FinishReason | None = None,
        partial_text: str | None = None,
        usage: Usage | None = None,
        index: int | None = None,
    ) -> Frame:
        return cls(
            text=f"{message} (error_code: {int(code)})",
            error_code=int(code),
            message=message,
            param=param,
            finish_reason=finish_reason,
            partial_text=partial_text,
            usage=usage,
            index=index,
        )

    @property
    def error_message(self) -> str:
        """What went wrong, in words (an error frame from another project has only `text`)."""
        return self.message if self.message is not None else self.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def body(self) -> dict[str, object]:
        """The frame as a JSON object (the body of a 4xx answer, say), without empty fields."""
        return self.model_dump(mode="json", exclude_none=True)


def encode_frame(frame: Frame) -> bytes:
    return frame.model_dump_json(exclude_none=True).encode() + NUL


def decode_frame(raw: bytes) -> Frame:
    """One frame (its NUL optional); ValueError if it is not a JSON object of the frame's shape."""
    try:
        return Frame.model_validate_json(raw.rstrip(NUL))
    except ValidationError as exc:
        raise ValueError(f"not a stream frame: {raw[:200]!r} ({exc.error_count()} problem(s))") from None


class FrameSplitter:
    """Cuts a byte stream into whole frames (each returned with its trailing NUL)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        if NUL not in chunk:
            self._buf += chunk
            return []
        *frames, rest = (bytes(self._buf) + chunk).split(NUL)
        self._buf = bytearray(rest)
        return [f + NUL for f in frames if f.strip()]

    def rest(self) -> bytes | None:
        """An unterminated last frame (with its NUL added), or None."""
        return bytes(self._buf) + NUL if bytes(self._buf).strip() else None


async def iter_raw_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Whole frames as bytes, as they arrive (a proxy passes them on unparsed)."""
    splitter = FrameSplitter()
    async for chunk in chunks:
        for raw in splitter.feed(chunk):
            yield raw
    if (last := splitter.rest()) is not None:
        yield last


async def iter_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[Frame]:
    """Parsed frames of a stream; a last frame without its NUL is accepted too."""
    async for raw in iter_raw_frames(chunks):
        yield decode_frame(raw)


def iter_frames_sync(chunks: Iterable[bytes]) -> Iterator[Frame]:
    splitter = FrameSplitter()
    for chunk in chunks:
        for raw in splitter.feed(chunk):
            yield decode_frame(raw)
    if (last := splitter.rest()) is not None:
        yield decode_frame(last)
