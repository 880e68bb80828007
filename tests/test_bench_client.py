"""The benchmark client's reading of frames: tokens per frame, inter-token latencies."""

from __future__ import annotations

import pytest

from llava_serve.protocol.frames import FinishReason, Frame, Usage
from llava_serve.tools.bench_client import StreamResult, _read_frame, token_gaps


def frame(text: str, tokens: int | None, finish: str | None = None) -> Frame:
    return Frame(
        text=text,
        usage=Usage.of(10, tokens) if tokens is not None else None,
        finish_reason=FinishReason(finish) if finish else None,
    )


def test_a_frame_of_several_tokens_splits_its_gap_evenly() -> None:
    result = StreamResult(start=0.0)
    _read_frame(result, frame(" a", 1), 1.0)
    _read_frame(result, frame(" a b", 2), 1.1)
    _read_frame(result, frame(" a b 東", 5), 1.4)  # three tokens: one character in bytes
    _read_frame(result, frame(" a b 東", 5, "length"), 1.4)
    assert result.frame_tokens == [1, 2, 5] and result.completion_tokens == 5
    assert token_gaps(result) == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_frames_without_usage_count_one_token_each() -> None:
    result = StreamResult(start=0.0)
    for i, t in enumerate([1.0, 1.2, 1.5]):
        _read_frame(result, frame("x" * (i + 1), None), t)
    assert token_gaps(result) == pytest.approx([0.2, 0.3])
