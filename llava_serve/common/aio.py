"""Small asyncio helpers: run-all-or-cancel, and merging several async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


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
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()

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
        await asyncio.gather(*tasks, return_exceptions=True)
