"""The serving path's HTTP/1.1 transport against real sockets: a scripted asyncio server for the
edge cases (each test says what the server sends) and uvicorn for the real thing."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from llava_serve.cluster.client import describe
from llava_serve.common.http1 import Http1Transport

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A TCP server that runs `handler` per connection and counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        return await reader.readexactly(length)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_keeps_the_connection_and_sends_method_path_headers_and_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                body = await server.read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport(), headers={"authorization": "Bearer k"}) as c:
        for i in range(3):
            r = await c.post(url + f"/echo?i={i}", json={"n": i})
            assert (r.status_code, r.json()) == (200, {"n": i})
    assert server.connections == 1  # one connection carried all three
    first = server.heads[0].split(b"\r\n")
    assert first[0] == b"POST /echo?i=0 HTTP/1.1"
    assert b"authorization: Bearer k" in first


async def test_chunks_are_passed_on_as_they_arrive() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"first\0"))
        await release.wait()  # the second chunk only after the client has read the first
        writer.write(chunk(b"second\0") + b"0\r\n\r\n")

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport()) as c:
        got = []
        async with c.stream("POST", url + "/s", content=b"{}") as r:
            async for data in r.aiter_bytes():
                got.append(data)
                release.set()
        assert got == [b"first\0", b"second\0"]


async def test_a_large_chunk_split_across_reads_and_trailers() -> None:
    big = bytes(range(256)) * 1000  # 256 kB in one chunk: several socket reads

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x;ext=1\r\n" % len(big) + big + b"\r\n" + chunk(b"tail") + b"0\r\nx-trailer: 1\r\n\r\n")
        await server.read_request(reader)  # the connection is reused after the trailers
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport()) as c:
        r = await c.get(url + "/big")
        assert r.content == big + b"tail"
        assert (await c.get(url + "/next")).status_code == 204
    assert server.connections == 1


async def test_body_to_end_of_connection_and_connection_close_are_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")  # no length: the body ends with the connection
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport()) as c:
        assert (await c.get(url)).text == "until the end"
        assert (await c.get(url)).text == "ok"
        assert (await c.get(url)).text == "ok"
    assert server.connections == 3


async def test_connection_refused_reads_as_httpx_connect_error_with_the_cause() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with httpx.AsyncClient(transport=Http1Transport()) as c:
        with pytest.raises(httpx.ConnectError) as info:
            await c.post(f"http://127.0.0.1:{port}/x", content=b"{}")
    assert describe(info.value) == "Connection refused"


async def test_read_timeout_mid_body_and_the_connection_is_dropped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"a"))
        await asyncio.sleep(5)  # then nothing

    server = Scripted(handler)
    timeout = httpx.Timeout(5.0, read=0.3)
    async with server as url, httpx.AsyncClient(transport=Http1Transport(), timeout=timeout) as c:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with c.stream("GET", url) as r:
            with pytest.raises(httpx.ReadTimeout):
                async for _ in r.aiter_bytes():
                    pass
        assert 0.25 < loop.time() - start < 2.0
        task = asyncio.current_task()
        if sys.version_info >= (3, 11) and task is not None:
            assert task.cancelling() == 0  # the timeout's cancel was taken back


async def test_a_slow_stream_within_the_read_timeout_is_fine() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(5):  # 5 x 0.15 s in all, each gap well under the 0.4 s read timeout
            writer.write(chunk(b"%d" % i))
            await asyncio.sleep(0.15)
        writer.write(b"0\r\n\r\n")

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport(), timeout=httpx.Timeout(5.0, read=0.4)) as c:
        assert (await c.get(url)).text == "01234"


async def test_server_closing_mid_body_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(url)


@pytest.mark.parametrize(
    "answer",
    [b"NOT HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", b"HTTP/1.1 200 OK\r\nx: " + b"a" * 70_000],
    ids=["status line", "header line", "head too large"],
)
async def test_malformed_answers_are_protocol_errors(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await asyncio.sleep(1)

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(url)


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()  # then the server closes it (as uvicorn does after its keep-alive time)

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport()) as c:
        assert (await c.get(url)).text == "ok"
        await asyncio.sleep(0.1)  # the close reaches the client's pooled connection
        assert (await c.get(url)).text == "ok"
    assert server.connections == 2


async def test_leaving_a_stream_early_drops_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"x"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    server = Scripted(handler)
    async with server as url, httpx.AsyncClient(transport=Http1Transport()) as c:
        for _ in range(2):  # each stream is left after its first chunk: never finished, never reused
            async with c.stream("GET", url) as r:
                async for _ in r.aiter_bytes():
                    break
    assert server.connections == 2


async def test_against_uvicorn() -> None:
    async def stream(request: Request) -> StreamingResponse:
        n = int((await request.json())["n"])

        async def frames() -> AsyncIterator[bytes]:
            for i in range(n):
                yield b'{"i": %d}\0' % i

        return StreamingResponse(frames())

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("x" * 100_000)

    app = Starlette(routes=[Route("/s", stream, methods=["POST"]), Route("/p", plain)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    for _ in range(250):  # up to 5 s for the server to listen
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(transport=Http1Transport(), base_url=f"http://127.0.0.1:{port}") as c:
            for n in (1, 50):
                async with c.stream("POST", "/s", json={"n": n}) as r:
                    assert r.headers["transfer-encoding"] == "chunked"
                    body = b"".join([b async for b in r.aiter_bytes()])
                assert body.split(b"\0")[:-1] == [b'{"i": %d}' % i for i in range(n)]
            assert len((await c.get("/p")).text) == 100_000
    finally:
        server.should_exit = True
        await task
