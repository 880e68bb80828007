"""The ingress's side of a model deployment: send an `HttpCall` to a replica through Serve's handle,
retry on another replica while nothing has reached the client, and never wait forever.

The same rules as the controller's stream proxy (controller/proxy.py), for replicas instead of
worker addresses:
- a replica that dies (or answers that it is going away) before its first body byte: the request is
  sent again, to another replica, up to `tries` times; Serve has taken the dead one out of its
  routing by then (it learns of the death from the failed call);
- a call read whole before it is answered (`whole=True`: the non-streaming routes) is sent again
  whenever its replica dies, since nobody has seen any of it;
- a replica that dies mid-stream ends the stream with an error frame (WorkerUnavailable, 50006);
- every wait for the next item has a deadline (`item_timeout`), so nothing hangs;
- Serve's full queue (`max_queued_requests`, BackPressureError) is `Overloaded`: 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from llava_serve.common.aio import aclose_shielded
from llava_serve.errors import ErrorCode, NoWorker, Overloaded, ServeError, WorkerUnavailable
from llava_serve.protocol.frames import FinishReason, decode_frame, encode_frame, iter_raw_frames
from llava_serve.ray.asgi import HttpCall, HttpHead

log = logging.getLogger("llava_serve.ray")

# A replica answering with these is going away: the request goes to another one.
GOING_AWAY = {int(ErrorCode.WORKER_SHUTTING_DOWN), int(ErrorCode.ENGINE_DEAD)}
GONE = (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError, OutOfMemoryError)


class ReplicaGone(Exception):
    """The replica serving a call died or cannot be reached."""


def replica_gone(exc: BaseException) -> bool:
    return isinstance(exc, GONE) or isinstance(getattr(exc, "cause", None), GONE)


@dataclass
class Answer:
    """A replica's answer, open: its head, what was read so far (the whole body when `rest` is None)."""

    head: HttpHead
    body: bytes
    rest: AsyncGenerator[bytes, None] | None = None

    async def aclose(self) -> None:
        if self.rest is not None:
            await aclose_shielded(self.rest)


class Upstream:
    def __init__(self, model: str, handle: Any, *, tries: int, item_timeout: float, backoff: float = 0.2) -> None:
        self.model = model
        self.handle = handle.options(method_name="http", stream=True)
        self.tries = tries
        self.item_timeout = item_timeout
        self.backoff = backoff

    async def send(self, call: HttpCall, *, whole: bool) -> Answer:
        """The answer to `call`. `whole`: read all of it (retried whenever its replica dies); else
        the head and the first body chunk (retried until then), the rest to be read from `rest`."""
        failures: list[str] = []
        for attempt in range(self.tries):
            if attempt:
                await asyncio.sleep(self.backoff * attempt)
            stream = self._stream(call)
            try:
                answer = await self._open(stream, whole)
            except ReplicaGone as exc:
                failures.append(str(exc))
                log.warning("%s %s: replica of %s lost before its answer (try %d): %s",
                            call.method, call.path, self.model, attempt + 1, exc)  # fmt: skip
                await aclose_shielded(stream)
                continue
            except BaseException:
                await aclose_shielded(stream)
                raise
            if answer.head.status == 503 and _going_away(answer.body):
                failures.append(f"going away: {answer.body[:200]!r}")
                await answer.aclose()
                continue
            return answer
        raise WorkerUnavailable(
            f"no replica of model {self.model!r} answered {call.path} ({len(failures)} tries; last: {failures[-1]})"
        )

    async def _open(self, stream: AsyncGenerator[HttpHead | bytes, None], whole: bool) -> Answer:
        head = await anext(stream)
        if not isinstance(head, HttpHead):
            raise WorkerUnavailable(f"a replica of {self.model} answered without a head: {head!r:.200}")
        if whole or head.status != 200:
            return Answer(head, b"".join([chunk async for chunk in stream]))  # type: ignore[misc]
        first = await anext(stream, b"")
        return Answer(head, first, stream)  # type: ignore[arg-type]

    async def _stream(self, call: HttpCall) -> AsyncGenerator[HttpHead | bytes, None]:
        """The replica's items, each within `item_timeout`; a lost replica is `ReplicaGone`, a full
        queue `Overloaded`. Closing this cancels the call in the replica (its engine request too)."""
        response = None
        finished = False
        try:
            response = self.handle.remote(call)  # a full queue may refuse here already
            while True:
                try:
                    item = await asyncio.wait_for(anext(response), self.item_timeout)
                except StopAsyncIteration:
                    finished = True
                    return
                yield item
        except BackPressureError as exc:
            raise Overloaded(
                f"every replica of model {self.model!r} is busy and its queue is full ({exc}); retry shortly"
            ) from None
        except DeploymentUnavailableError:
            raise NoWorker(f"model {self.model!r} has no running replica (its deployment failed)") from None
        except TimeoutError:
            raise WorkerUnavailable(
                f"a replica of model {self.model!r} sent nothing for {self.item_timeout:g} s"
            ) from None
        except ServeError:
            raise
        except Exception as exc:
            if replica_gone(exc):
                raise ReplicaGone(_first_line(exc)) from None
            raise WorkerUnavailable(f"a replica of model {self.model!r} failed: {_first_line(exc)}") from None
        finally:
            if response is not None and not finished:
                cancel(response)


async def relay_frames(model: str, answer: Answer) -> AsyncIterator[bytes]:
    """A stream route's frames as they come; if the replica is lost mid-stream, a last error frame
    saying so (the client has seen part of the answer: it is not sent again)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield answer.body
        if answer.rest is not None:
            async for chunk in answer.rest:
                yield chunk

    try:
        async for frame in iter_raw_frames(chunks()):
            yield frame
    except ReplicaGone as exc:
        log.warning("stream of %s lost mid-way: %s", model, exc)
        died = WorkerUnavailable(f"the replica of model {model!r} serving this request died mid-stream ({exc}); retry")
        yield encode_frame(died.frame(finish_reason=FinishReason.ERROR))
    except ServeError as err:  # silence past the deadline, a replica that failed
        log.warning("stream of %s failed mid-way: %s", model, err.message)
        yield encode_frame(err.frame(finish_reason=FinishReason.ERROR))
    finally:
        await answer.aclose()


def cancel(response: Any) -> None:
    """Cancel a handle call, whatever state it is in: Serve's `cancel()` raises the call's own error
    again (a full queue, say) when the call failed before a replica took it."""
    try:
        response.cancel()
    except Exception as exc:
        log.debug("cancelling a call that already failed: %s", _first_line(exc))


def _going_away(body: bytes) -> bool:
    try:
        return decode_frame(body).error_code in GOING_AWAY
    except ValueError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
