"""The ingress's rules for a replica's answer, against a scripted stand-in for Serve's handle: retry
before the first byte, an error frame after it, 429 for Serve's full queue, a deadline on silence."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llava_serve.errors import ErrorCode, Overloaded, ServeError, WorkerUnavailable
from llava_serve.protocol.frames import Frame, decode_frame, encode_frame
from tests.ray.conftest import require_ray

require_ray()
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError  # noqa: E402

from llava_serve.ray.asgi import HttpCall, HttpHead  # noqa: E402
from llava_serve.ray.upstream import Upstream, relay_frames  # noqa: E402

OK = HttpHead(200, (("content-type", "application/octet-stream"),))
CALL = HttpCall("POST", "/worker_generate_stream", b"{}")
HANG = object()


def frame(text: str, done: bool = False) -> bytes:
    return encode_frame(Frame(text=text, finish_reason="length" if done else None))


class Response:
    """One call's answer: its items in order; an exception item is raised there; HANG never comes."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.cancelled = False
        self.failed: BaseException | None = None

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if item is HANG:
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            self.failed = item
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True
        if self.failed is not None:  # as Serve's does: the call's own error again
            raise self.failed


class Handle:
    """Serve's handle: each call gets the next scripted answer (an exception: `remote` raises it)."""

    def __init__(self, *answers: list[Any] | BaseException) -> None:
        self.answers = [a if isinstance(a, BaseException) else Response(a) for a in answers]
        self.sent: list[Response] = []

    def options(self, **_: Any) -> Handle:
        return self

    def remote(self, call: HttpCall) -> Response:
        answer = self.answers[len(self.sent)]
        if isinstance(answer, BaseException):
            self.answers.pop(len(self.sent))
            raise answer
        self.sent.append(answer)
        return answer


def upstream(handle: Handle, timeout: float = 5.0) -> Upstream:
    return Upstream("m", handle, tries=3, item_timeout=timeout, backoff=0.01)


async def relayed(up: Upstream, whole: bool = False) -> list[Frame]:
    answer = await up.send(CALL, whole=whole)
    return [decode_frame(raw) async for raw in relay_frames("m", answer)]


def gone() -> ReplicaUnavailableError:
    return ReplicaUnavailableError("replica-1")


def test_a_replica_lost_before_its_first_byte_is_tried_again_elsewhere() -> None:
    handle = Handle([gone()], [OK, gone()], [OK, frame("a"), frame("ab", done=True)])
    frames = asyncio.run(relayed(upstream(handle)))
    assert [f.text for f in frames] == ["a", "ab"] and len(handle.sent) == 3
    assert handle.sent[0].cancelled and handle.sent[1].cancelled  # each abandoned call is cancelled


def test_a_replica_lost_mid_stream_ends_it_with_an_error_frame() -> None:
    handle = Handle([OK, frame("a"), gone()])
    frames = asyncio.run(relayed(upstream(handle)))
    assert frames[0].text == "a" and len(handle.sent) == 1
    assert frames[-1].error_code == ErrorCode.CONTROLLER_WORKER_TIMEOUT and frames[-1].finish_reason is not None
    assert "died mid-stream" in (frames[-1].message or "")


def test_a_whole_answer_is_asked_again_when_its_replica_dies_half_way() -> None:
    handle = Handle([OK, frame("a"), gone()], [OK, frame("x"), frame("xy", done=True)])
    answer = asyncio.run(upstream(handle).send(CALL, whole=True))
    assert answer.rest is None and answer.body == frame("x") + frame("xy", done=True)


def test_every_try_lost_is_a_clear_502() -> None:
    with pytest.raises(WorkerUnavailable, match="3 tries"):
        asyncio.run(upstream(Handle([gone()], [gone()], [gone()])).send(CALL, whole=False))


def test_a_replica_going_away_sends_the_request_elsewhere() -> None:
    going = encode_frame(Frame(text="bye", error_code=ErrorCode.WORKER_SHUTTING_DOWN))
    handle = Handle([HttpHead(503), going], [OK, frame("a", done=True)])
    assert [f.text for f in asyncio.run(relayed(upstream(handle)))] == ["a"]


def test_a_4xx_answer_is_passed_on_whole() -> None:
    bad = encode_frame(Frame(text="bad", error_code=ErrorCode.IMAGE_COUNT_MISMATCH))
    answer = asyncio.run(upstream(Handle([HttpHead(400), bad])).send(CALL, whole=False))
    assert answer.head.status == 400 and answer.body == bad and answer.rest is None


@pytest.mark.parametrize("when", ["remote", "first item"])
def test_serves_full_queue_is_overloaded(when: str) -> None:
    full = BackPressureError(num_queued_requests=4, max_queued_requests=4)
    handle = Handle(full) if when == "remote" else Handle([full])
    with pytest.raises(Overloaded) as refused:
        asyncio.run(upstream(handle).send(CALL, whole=False))
    assert refused.value.http_status == 429 and refused.value.retry_after >= 1


def test_silence_has_a_deadline() -> None:
    with pytest.raises(WorkerUnavailable, match="sent nothing"):
        asyncio.run(upstream(Handle([HANG]), timeout=0.2).send(CALL, whole=False))
    frames = asyncio.run(relayed(upstream(Handle([OK, frame("a"), HANG]), timeout=0.2)))
    assert frames[-1].error_code and "sent nothing" in (frames[-1].message or "")


def test_a_client_that_leaves_cancels_the_call() -> None:
    handle = Handle([OK, frame("a"), frame("ab"), HANG])

    async def leave() -> None:
        answer = await upstream(handle).send(CALL, whole=False)
        relay = relay_frames("m", answer)
        await anext(relay)
        await relay.aclose()

    asyncio.run(leave())
    assert handle.sent[0].cancelled


def test_other_failures_are_not_retried() -> None:
    handle = Handle([RuntimeError("a bug")], [OK])
    with pytest.raises(ServeError, match="a bug"):
        asyncio.run(upstream(handle).send(CALL, whole=False))
    assert len(handle.sent) == 1
