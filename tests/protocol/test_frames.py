"""The stream codec: frames split across chunks, round trips, error frames, other projects' frames."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llava_serve.errors import ContextOverflow, ErrorCode, error_from_frame
from llava_serve.protocol.frames import (
    FinishReason,
    Frame,
    FrameSplitter,
    Usage,
    decode_frame,
    encode_frame,
    iter_frames,
    iter_frames_sync,
)


def test_splitter_cuts_whole_frames_across_chunks() -> None:
    splitter = FrameSplitter()
    assert splitter.feed(b'{"text": "a"') == []
    assert splitter.feed(b', "error_code": 0}\0{"te') == [b'{"text": "a", "error_code": 0}\0']
    assert splitter.feed(b'xt": "ab"}\0\0') == [b'{"text": "ab"}\0']
    assert splitter.rest() is None


@pytest.mark.anyio
async def test_iter_frames_reads_an_unterminated_last_frame() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for c in (b'{"text": "x", ', b'"error_code": 0}\0{"text": "last", "error_code": 1}'):
            yield c

    frames = [f async for f in iter_frames(chunks())]
    assert [(f.text, f.error_code) for f in frames] == [("x", 0), ("last", 1)]
    assert [f.text for f in iter_frames_sync([b'{"text": "y"}\0{"te', b'xt": "z"}'])] == ["y", "z"]


def test_round_trip_and_wire_shape() -> None:
    frame = Frame(text="a red circle", usage=Usage.of(12, 3), finish_reason=FinishReason.STOP, index=1)
    raw = encode_frame(frame)
    assert raw.endswith(b"\0") and raw.count(b"\0") == 1
    assert decode_frame(raw) == frame
    # LLaVA's clients read exactly these keys; empty fields stay off the wire
    assert b'"message"' not in raw and b'"finish_reason":"stop"' in raw and b'"error_code":0' in raw


def test_error_frame_keeps_the_code_out_of_the_message() -> None:
    err = ContextOverflow("the prompt is 9000 tokens", param="messages")
    frame = decode_frame(encode_frame(err.frame(finish_reason=FinishReason.ERROR)))
    assert frame.text == "the prompt is 9000 tokens (error_code: 40303)"  # what LLaVA's demo shows
    assert frame.message == "the prompt is 9000 tokens" and frame.param == "messages"
    back = error_from_frame(frame)
    assert isinstance(back, ContextOverflow) and back.message == err.message and back.param == "messages"


def test_frames_of_other_projects_are_read() -> None:
    llava = decode_frame(b'{"text": "USER: hi ASSISTANT: hello", "error_code": 0}\0')
    assert llava.text.endswith("hello") and llava.usage is None and not llava.finished
    fastchat = decode_frame(b'{"text": "boom (error_code: 50001)", "error_code": 50001, "extra": 1}')
    assert fastchat.error_message == "boom (error_code: 50001)" and fastchat.error_code == ErrorCode.INTERNAL_ERROR


@pytest.mark.parametrize("raw", [b"[1, 2]\0", b"not json\0", b'{"error_code": "x"}\0'])
def test_not_a_frame_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a stream frame"):
        decode_frame(raw)
