"""The worker stream format: JSON objects each followed by a NUL byte (SPEC 3)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any


class FrameSplitter:
    """Cuts a byte stream into whole frames (each returned with its trailing NUL)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\0" not in chunk:
            self._buf += chunk
            return []
        *frames, rest = (bytes(self._buf) + chunk).split(b"\0")
        self._buf = bytearray(rest)
        return [f + b"\0" for f in frames if f.strip()]

    @property
    def rest(self) -> bytes:
        """Bytes after the last NUL: an unterminated last frame, or empty."""
        return bytes(self._buf)


def parse_frame(frame: bytes) -> dict[str, Any]:
    obj = json.loads(frame.rstrip(b"\0"))
    if not isinstance(obj, dict):
        raise ValueError(f"stream frame is not a JSON object: {frame[:200]!r}")
    return obj


async def iter_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Parsed frames of a stream; a last frame without its NUL is accepted too."""
    splitter = FrameSplitter()
    async for chunk in chunks:
        for frame in splitter.feed(chunk):
            yield parse_frame(frame)
    if splitter.rest.strip():
        yield parse_frame(splitter.rest)
