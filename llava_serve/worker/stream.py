"""Hand engine outputs (engine thread) to one HTTP response (event loop).

Outputs carry cumulative text, so only the latest matters: a slow reader gets fewer, larger
frames and memory stays bounded, whatever the engine's pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llava_serve.engine.request import RequestOutput


class OutputChannel:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._latest: RequestOutput | None = None
        self._final: RequestOutput | None = None

    def sink(self, out: RequestOutput) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._set, out)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more

    def _set(self, out: RequestOutput) -> None:
        if self._final is not None:
            return
        self._latest = out
        if out.finished:
            self._final = out
        self._event.set()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            await self._event.wait()
            self._event.clear()
            out, self._latest = self._latest, None
            if out is not None:
                yield out
                if out.finished:
                    return
