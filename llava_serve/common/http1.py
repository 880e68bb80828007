"""A lean HTTP/1.1 transport for httpx, for the hops of the serving path (API -> controller -> worker).

httpx's own transport (httpcore over anyio: a cancel scope, a timeout scope and several layers of
wrappers for every read and write) cost the controller ~3.5 ms of a request's time to first token
on this project's 2-core benchmark machine, more than the rest of the hop together
(docs/benchmark.md, "API overhead"). This transport speaks plain HTTP/1.1 over asyncio streams with
keep-alive connections: one write per request, one read per arriving chunk. Everything above it is
still httpx (auth headers, timeouts, `Response`, the exception types the callers catch), so callers
and tests that inject another transport do not change. `https://` goes to httpx's own transport.

What it does not do: HTTP/2, proxies, `Expect: 100-continue`, request bodies that are streams of
unknown length (it reads the body first; every hop here sends a JSON body).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from typing import NoReturn, TypeVar

import httpx

T = TypeVar("T")
MAX_HEAD = 64 * 1024  # a response head (status line + headers) larger than this is refused
READ_SIZE = 64 * 1024
MAX_LINE = 4 * 1024  # a chunk-size line longer than this is refused


async def _within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """`awaitable`, or asyncio.TimeoutError after `seconds` (None: no limit)."""
    if seconds is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        """Idle, open and not past its keep-alive time (the server closes idle connections too)."""
        return not (self.reader.at_eof() or self.writer.is_closing() or now - self.idle_since > expiry)

    def close(self) -> None:
        self.writer.close()


class Http1Transport(httpx.AsyncBaseTransport):
    def __init__(self, *, keepalive_expiry: float = 4.0, max_idle_per_host: int = 64) -> None:
        # 4 s: under uvicorn's default keep-alive timeout (5 s), so a pooled connection is dropped
        # here before the server drops it under a request.
        self.keepalive_expiry = keepalive_expiry
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._fallback: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(trust_env=False)
            return await self._fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        key = (request.url.host, request.url.port or 80)
        conn = await self._connect(key, timeouts.get("connect"))
        try:
            conn.writer.write(_head(request) + body)
            if conn.writer.transport.get_write_buffer_size():  # the socket took only part of it
                await _within(timeouts.get("write"), conn.writer.drain())
            status, reason, headers, version = await _within(timeouts.get("read"), _read_head(conn.reader))
        except BaseException as exc:
            conn.close()
            _reraise(exc, request, "sending the request or reading the response head")
        bodyless = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        stream = _Body(self, key, conn, request, headers, version, timeouts.get("read"), bodyless)
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": version.encode("ascii"), "reason_phrase": reason.encode("latin-1")},
        )

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        now = time.monotonic()
        idle = self._idle.get(key, [])
        while idle:
            conn = idle.pop()
            if conn.usable(now, self.keepalive_expiry):
                return conn
            conn.close()
        try:
            reader, writer = await _within(timeout, asyncio.open_connection(*key, limit=MAX_HEAD))
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from exc
        return _Connection(reader, writer)

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; the connection goes back to the pool once it is all read.

    One socket read per arriving packet, parsed from a buffer here. The read timeout is one timer
    per body, not one per read: `_watch` cancels a read that has waited `read_timeout` seconds.
    """

    def __init__(
        self,
        transport: Http1Transport,
        key: tuple[str, int],
        conn: _Connection,
        request: httpx.Request,
        headers: list[tuple[bytes, bytes]],
        version: str,
        read_timeout: float | None,
        bodyless: bool,
    ) -> None:
        self.transport, self.key, self.conn, self.request = transport, key, conn, request
        self.read_timeout = read_timeout
        fields = {k.lower(): v.lower() for k, v in headers}
        self.chunked = not bodyless and b"chunked" in fields.get(b"transfer-encoding", b"")
        length = b"0" if bodyless else fields.get(b"content-length")
        self.length: int | None = None if self.chunked or length is None else _content_length(length)
        self.reusable = version == "HTTP/1.1" and b"close" not in fields.get(b"connection", b"")
        self.buf = bytearray()
        self.done = self.length == 0  # a body known to be empty is read
        self.closed = False
        self._waiting: asyncio.Task[object] | None = None  # the task blocked in a read, if any
        self._since = 0.0  # when that read began
        self._timed_out = False
        self._timer: asyncio.TimerHandle | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._chunked() if self.chunked else self._plain():
                yield data
        except BaseException as exc:
            self._shut()
            _reraise(exc, self.request, "reading the response body")

    async def _plain(self) -> AsyncIterator[bytes]:
        remaining = self.length
        while remaining is None or remaining > 0:
            data = await self._recv()
            if not data:
                if remaining is None:  # the body ends with the connection
                    self.reusable = False
                    break
                raise asyncio.IncompleteReadError(b"", remaining)
            if remaining is not None:
                if len(data) > remaining:
                    raise httpx.RemoteProtocolError("the server sent more than its Content-Length")
                remaining -= len(data)
            yield data
        self.done = True

    async def _chunked(self) -> AsyncIterator[bytes]:
        buf = self.buf
        while True:
            while (end := buf.find(b"\r\n")) < 0:
                await self._more(MAX_LINE)
            try:
                size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"invalid chunk size line {bytes(buf[:40])!r}") from None
            del buf[: end + 2]
            if size == 0:
                while (end := buf.find(b"\r\n")) != 0:  # trailers (ignored) up to an empty line
                    if end > 0:
                        del buf[: end + 2]
                    else:
                        await self._more(MAX_HEAD)
                del buf[:2]
                self.reusable = self.reusable and not buf  # bytes after the body: not reusable
                self.done = True
                return
            while size > 0:  # a chunk is passed on as it arrives, in pieces if it is large
                if not buf:
                    await self._more(None)
                piece = bytes(buf[:size])
                del buf[: len(piece)]
                size -= len(piece)
                yield piece
            while len(buf) < 2:
                await self._more(None)
            if buf[:2] != b"\r\n":
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")
            del buf[:2]

    async def _more(self, cap: int | None) -> None:
        """At least one more byte into the buffer; `cap`: the most it may hold (a line too long)."""
        if cap is not None and len(self.buf) > cap:
            raise httpx.RemoteProtocolError("chunk header or trailer line too long")
        data = await self._recv()
        if not data:
            raise asyncio.IncompleteReadError(bytes(self.buf), None)
        self.buf += data

    async def _recv(self) -> bytes:
        loop = asyncio.get_running_loop()
        self._waiting, self._since = asyncio.current_task(), loop.time()
        if self.read_timeout is not None and self._timer is None:
            self._timer = loop.call_at(self._since + self.read_timeout, self._watch)
        try:
            return await self.conn.reader.read(READ_SIZE)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            if sys.version_info >= (3, 11) and self._waiting is not None:
                self._waiting.uncancel()
            raise asyncio.TimeoutError from None
        finally:
            self._waiting = None

    def _watch(self) -> None:
        assert self.read_timeout is not None
        self._timer = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        if self._waiting is not None and loop.time() - self._since >= self.read_timeout:
            self._timed_out = True
            self._waiting.cancel()
            return
        start = self._since if self._waiting is not None else loop.time()
        self._timer = loop.call_at(start + self.read_timeout, self._watch)

    def _shut(self, reuse: bool = False) -> None:
        """Done with the body: the connection back to the pool (`reuse`) or closed."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reuse:
            self.transport._release(self.key, self.conn)
        else:
            self.conn.close()

    async def aclose(self) -> None:
        if not self.closed:  # an unread body: the connection cannot carry another request
            self._shut(reuse=self.done and self.reusable)


def _head(request: httpx.Request) -> bytes:
    target = request.url.raw_path  # path and query, as httpx encoded them
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), target)]
    lines += [k + b": " + v for k, v in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, list[tuple[bytes, bytes]], str]:
    while True:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise httpx.RemoteProtocolError(f"response head over {MAX_HEAD} bytes") from None
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"invalid status line {lines[0][:60]!r}")
        status = int(parts[1])
        if status == 100:
            continue  # an interim answer: the real one follows
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise httpx.RemoteProtocolError(f"invalid header line {line[:60]!r}")
            headers.append((name, value.strip()))
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        return status, reason, headers, parts[0].decode("ascii")


def _content_length(value: bytes) -> int:
    if not value.strip().isdigit():
        raise httpx.RemoteProtocolError(f"invalid Content-Length {value[:20]!r}")
    return int(value)


def _reraise(exc: BaseException, request: httpx.Request, doing: str) -> NoReturn:
    """Raise the httpx exception a caller of httpx expects for `exc`; cancellation and httpx's own
    errors pass through as they are."""
    if isinstance(exc, asyncio.TimeoutError):
        raise httpx.ReadTimeout(f"timed out {doing}", request=request) from exc
    if isinstance(exc, asyncio.IncompleteReadError):
        raise httpx.RemoteProtocolError(f"the server closed the connection while {doing}", request=request) from exc
    if isinstance(exc, OSError):
        raise httpx.ReadError(f"{doing}: {exc}", request=request) from exc
    raise exc
