"""common/aio (gather_or_cancel, merge) and common/frames (NUL-delimited frame splitting)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llava_serve.common.aio import gather_or_cancel, merge

pytestmark = pytest.mark.anyio


async def test_gather_or_cancel_cancels_the_rest_on_failure() -> None:
    cancelled = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def fail() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    assert await gather_or_cancel([]) == []
    assert await gather_or_cancel([asyncio.sleep(0, result=1), asyncio.sleep(0.01, result=2)]) == [1, 2]
    with pytest.raises(ValueError, match="boom"):
        await gather_or_cancel([slow(), fail()])
    assert cancelled.is_set()


async def test_merge_interleaves_raises_and_closes() -> None:
    closed: list[str] = []

    async def gen(name: str, n: int, delay: float, fail: bool = False) -> AsyncIterator[str]:
        try:
            for i in range(n):
                await asyncio.sleep(delay)
                yield f"{name}{i}"
            if fail:
                raise RuntimeError(f"{name} failed")
        finally:
            closed.append(name)

    items = [x async for x in merge([gen("a", 3, 0.01), gen("b", 2, 0.015)])]
    assert sorted(items) == ["a0", "a1", "a2", "b0", "b1"] and items[0] == "a0"
    closed.clear()
    with pytest.raises(RuntimeError, match="b failed"):
        async for _ in merge([gen("a", 100, 0.01), gen("b", 1, 0.01, fail=True)]):
            pass
    await asyncio.sleep(0)
    assert sorted(closed) == ["a", "b"]  # the healthy stream was stopped too
    closed.clear()
    merged = merge([gen("a", 100, 0.01), gen("b", 100, 0.01)])
    assert await merged.__anext__() in ("a0", "b0")
    await merged.aclose()  # a client that goes away
    assert sorted(closed) == ["a", "b"]
