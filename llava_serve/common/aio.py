"""Small asyncio helpers: shielded cleanup, run-all-or-cancel, merging async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Protocol, TypeVar

import anyio

T = TypeVar("T")
_DONE = object()


class _Closable(Protocol):
    async def aclose(self) -> None: ...


async def aclose_shielded(*resources: _Closable) -> None:
    """Close upstream streams even while the task is being cancelled.

    Starlette cancels a streaming response through an anyio cancel scope, which cancels every
    await inside it again, the ones in `finally` blocks too. An httpx response whose close is
    cut short counts as closed yet leaves its connection open, and the worker keeps generating.
    """
    with anyio.CancelScope(shield=True):
        for resource in resources:
            await resource.aclose()


async def gather_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the others before it is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def merge(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of all iterators as they come; the first error is raised; closing stops them all."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put(item)
            await queue.put(_DONE)
        except Exception as exc:
            await queue.put(exc)
        finally:
            if hasattr(it, "aclose"):
                await aclose_shielded(it)  # type: ignore[arg-type]

    tasks = [asyncio.create_task(pump(it)) for it in iterators]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):  # stopped and closed before this returns
            await asyncio.gather(*tasks, return_exceptions=True)
