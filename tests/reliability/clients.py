"""Async clients for the fault tests: each returns what its user saw, never raises, never hangs.

An `Outcome` is one request's story: the HTTP status (0 if none came), the last frame or SSE event,
how many frames arrived, how it ended (`done`, `error_frame`, `http_error`, `cut`, `left`), and when.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.reliability.helpers import PROMPT, png_b64


@dataclass
class Outcome:
    status: int = 0
    ended: str = "none"  # done | error_frame | http_error | cut | left
    frames: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    seconds: float = 0.0
    retry_after: str | None = None


def worker_body(i: int = 0, max_new_tokens: int = 64, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny-llava",
        "prompt": PROMPT,
        "images": [png_b64(((37 * i) % 256, (11 * i) % 256, 160))],
        "temperature": 0.0,
        "max_new_tokens": max_new_tokens,
        "ignore_eos": True,
        **extra,
    }


def chat_body(i: int = 0, max_tokens: int = 64, stream: bool = True) -> dict[str, Any]:
    url = "data:image/png;base64," + png_b64(((37 * i) % 256, 90, (11 * i) % 256))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"What is {i}?"}]
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}  # fmt: skip


async def stream_frames(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> Outcome:  # fmt: skip
    """POST a worker-protocol stream (worker or controller) and read `\\0` frames."""
    out, t0 = Outcome(), time.monotonic()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            out.status, out.retry_after = resp.status_code, resp.headers.get("retry-after")
            buf = b""
            async for chunk in resp.aiter_bytes():
                buf += chunk
                *done, buf = buf.split(b"\0")
                for raw in done:
                    if raw.strip():
                        out.frames += 1
                        out.last = json.loads(raw)
                if stop_after is not None and out.frames >= stop_after:
                    out.ended = "left"
                    break
            else:
                if buf.strip():  # an error answer is one JSON object without the NUL
                    out.last = json.loads(buf)
                    out.frames += 1
                out.ended = _ending(out)
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        out.ended, out.detail = "cut", type(exc).__name__
    out.seconds = time.monotonic() - t0
    return out


async def stream_sse(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> Outcome:
    """POST an OpenAI chat completion with stream=True and read its SSE events."""
    out, t0 = Outcome(), time.monotonic()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            out.status, out.retry_after = resp.status_code, resp.headers.get("retry-after")
            if resp.status_code != 200:
                out.last = json.loads(await resp.aread())
                out.ended = "http_error"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        out.ended = "error_frame" if "error" in out.last else "done"
                        break
                    event = json.loads(line[6:])
                    out.frames += 1
                    if "error" in event or event.get("choices"):
                        out.last = event
                else:
                    out.ended = "cut"
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        out.ended, out.detail = "cut", type(exc).__name__
    out.seconds = time.monotonic() - t0
    return out


def _ending(out: Outcome) -> str:
    if out.status != 200:
        return "http_error"
    if out.last.get("error_code", 0) != 0:
        return "error_frame"
    return "done" if out.last.get("finish_reason") else "cut"


def slow_socket_stream(
    host: str, port: int, path: str, body: dict[str, Any], chunk: int, pause: float, slow_for: float,
    headers: dict[str, str] | None = None,
) -> dict:  # type: ignore[type-arg]  # fmt: skip
    """A client that reads very slowly (a 4 KiB receive buffer, `chunk` bytes every `pause` seconds)
    for `slow_for` seconds, then catches up at full speed.

    Returns the frames it got (count), the last frame and the bytes read.
    """
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(120)
    sock.connect((host, port))
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + payload)
    data = b""
    slow_until = time.monotonic() + slow_for
    try:
        while True:
            slow = time.monotonic() < slow_until
            got = sock.recv(chunk if slow else 1 << 20)
            if not got:
                break
            data += got
            if slow:
                time.sleep(pause)
    finally:
        sock.close()
    _, _, rest = data.partition(b"\r\n\r\n")
    frames = _dechunk(rest)
    parsed = [json.loads(f) for f in frames.split(b"\0") if f.strip()]
    return {"frames": len(parsed), "last": parsed[-1] if parsed else {}, "bytes": len(data)}


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return out


async def gather_all(coros: list[Any], concurrency: int, timeout: float) -> list[Any]:
    """Run with bounded concurrency; the whole lot must finish within `timeout` (no hang)."""
    sem = asyncio.Semaphore(concurrency)

    async def bounded(coro: Any) -> Any:
        async with sem:
            return await coro

    return await asyncio.wait_for(asyncio.gather(*(bounded(c) for c in coros)), timeout)
