"""What one Python HTTP hop costs before any of the project's code: time to the first byte of a
streamed answer to a ~3 kB JSON POST, over a kept-alive connection, for a raw ASGI app and a FastAPI
route with a pydantic body, each under uvicorn's h11 and httptools protocols.

    python benchmarks/ingress_floor.py [--requests 300]

Each server runs alone in its own process; the client is httpx's sync client. The figures bound what
any front process written on these frameworks adds to a request's time to first token
(docs/benchmark.md, "API overhead").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import time
from typing import Any

FRAME = b'{"text": "x", "error_code": 0}\0'


def serve(kind: str, port: int) -> None:
    import uvicorn

    app: Any
    if kind.startswith("raw"):

        async def app(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            if scope["method"] == "POST":  # the readiness probe is a GET
                json.loads(body)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]})
            await send({"type": "http.response.body", "body": FRAME, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    else:
        from fastapi import FastAPI
        from fastapi.responses import StreamingResponse
        from pydantic import BaseModel

        class Body(BaseModel):
            model: str
            images: list[str]
            messages: list[dict]

        app = FastAPI()

        @app.post("/s")
        async def stream(body: Body) -> StreamingResponse:
            async def frames() -> Any:
                yield FRAME

            return StreamingResponse(frames())

    http = "httptools" if kind.endswith("httptools") else "h11"
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http=http, loop="asyncio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    body = json.dumps({"model": "m", "images": ["A" * 3000], "messages": [{"role": "user", "content": "hi"}]})
    for kind in ("raw ASGI / h11", "raw ASGI / httptools", "FastAPI / h11", "FastAPI / httptools"):
        port = free_port()
        framework, protocol = kind.split(" / ")
        server_kind = ("raw" if framework.startswith("raw") else "fastapi") + "-" + protocol
        server = mp.Process(target=serve, args=(server_kind, port), daemon=True)
        server.start()
        with httpx.Client() as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.get(f"http://127.0.0.1:{port}/")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.1)
            times = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                with client.stream("POST", f"http://127.0.0.1:{port}/s", content=body) as resp:
                    next(resp.iter_bytes())
                times.append(time.perf_counter() - t0)
        server.terminate()
        print(f"{kind:22s} median time to first byte {statistics.median(times[len(times) // 5 :]) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
