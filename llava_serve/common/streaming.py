"""A streaming response that always closes its body iterator.

Whichever way a response ends (done, client disconnected, task cancelled), the body generator's
`aclose()` runs, so its `finally` closes the upstream stream and the worker sees the disconnect.
Starlette alone leaves the generator to the garbage collector when `send` fails (ASGI >= 2.4).
"""

from __future__ import annotations

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
