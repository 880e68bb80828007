"""Image URLs: data: parsing and limits; the SSRF guard for remote URLs.

No traffic leaves the machine: hosts resolve through an injected resolver, and the only
transport that connects anywhere maps two made-up *public* IPs to a local server on 127.0.0.1
(any other destination fails the test). Refusals are checked without connecting at all.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from llava_serve.errors import ImageError, ImageTooLarge
from llava_serve.openai_api.images import ImageFetcher, ImagePolicy, data_url_payload, is_public_address
from tests.fakes.images import data_url, png_bytes

pytestmark = pytest.mark.anyio
PUBLIC_IP, CDN_IP = "93.184.215.14", "93.184.215.15"  # never contacted: rewritten to 127.0.0.1
HOSTS = {
    "images.test": [PUBLIC_IP],
    "cdn.test": [CDN_IP],
    "internal.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": [PUBLIC_IP, "127.0.0.1"],  # one bad answer is enough to refuse
    "v6loop.test": ["::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "localhost": ["127.0.0.1", "::1"],
}


async def fake_resolver(host: str, port: int) -> list[str]:
    if host not in HOSTS:
        raise OSError(f"unknown host {host}")
    return HOSTS[host]


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "127.8.9.1", "::1", "169.254.169.254", "10.0.0.1", "172.16.5.4", "192.168.1.1",
     "100.64.0.1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "fe80::1", "fe80::1%eth0", "fc00::1",
     "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "240.0.0.1", "255.255.255.255",
     "192.0.2.1", "198.18.0.1", "::ffff:8.8.8.8"],  # IPv4-mapped: refused outright (conservative)
)  # fmt: skip
def test_non_public_addresses_refused(ip: str) -> None:
    assert not is_public_address(ip)


@pytest.mark.parametrize("ip", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_allowed(ip: str) -> None:
    assert is_public_address(ip)


def test_data_urls() -> None:
    png = png_bytes()
    assert base64.b64decode(data_url_payload(data_url(), 10_000)) == png  # passed on as sent, not re-encoded
    wrapped = "data:image/png;base64," + "\n".join(base64.b64encode(png).decode()[i : i + 20] for i in range(0, 99, 20))
    assert base64.b64decode(data_url_payload(wrapped + base64.b64encode(png).decode()[100:], 10_000)) == png
    with pytest.raises(ImageError, match="not valid base64"):
        data_url_payload("data:image/png;base64,@@@@", 10_000)
    with pytest.raises(ImageError, match="not an image"):
        data_url_payload("data:text/html;base64,PGgxPg==", 10_000)
    with pytest.raises(ImageError, match="must look like"):
        data_url_payload("data:image/png,rawbytes", 10_000)
    with pytest.raises(ImageTooLarge):
        data_url_payload(data_url(), 10)


class NoConnect(httpx.AsyncBaseTransport):
    """Records where the fetcher would connect, and fails as an unreachable host would."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts.append((request.url.host, request.headers["host"]))
        raise httpx.ConnectError("test: no connections", request=request)


async def test_remote_images_off_by_default() -> None:
    fetcher = ImageFetcher(ImagePolicy(), fake_resolver, NoConnect())
    with pytest.raises(ImageError, match="remote image URLs are disabled"):
        await fetcher.to_base64("https://images.test/cat.png")
    with pytest.raises(ImageError, match="unsupported image URL"):
        await fetcher.to_base64("file:///etc/passwd")
    assert await fetcher.to_base64(data_url()) == base64.b64encode(png_bytes()).decode()
    # an inline image goes to the worker as sent: the worker decodes it once, with its own limits
    not_an_image = base64.b64encode(b"hello").decode()
    assert await fetcher.to_base64("data:image/png;base64," + not_an_image) == not_an_image


@pytest.mark.parametrize(
    ("url", "bad"),
    [
        ("http://127.0.0.1/x.png", "127.0.0.1"),
        ("http://[::1]:8080/x.png", "::1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://10.0.0.1/x.png", "10.0.0.1"),
        ("http://[::ffff:127.0.0.1]/x.png", "::ffff:127.0.0.1"),
        ("https://internal.test/x.png", "10.0.0.1"),
        ("https://metadata.test/", "169.254.169.254"),
        ("https://mixed.test/x.png", "127.0.0.1"),
        ("https://v6loop.test/x.png", "::1"),
        ("https://mapped.test/x.png", "::ffff:127.0.0.1"),
    ],
)
async def test_ssrf_refused_without_connecting(url: str, bad: str) -> None:
    transport = NoConnect()
    fetcher = ImageFetcher(ImagePolicy(allow_remote=True), fake_resolver, transport)
    with pytest.raises(ImageError, match="non-public address") as info:
        await fetcher.to_base64(url)
    assert bad in info.value.message
    assert transport.attempts == []


async def test_system_resolver_localhost_refused() -> None:
    transport = NoConnect()
    fetcher = ImageFetcher(ImagePolicy(allow_remote=True), transport=transport)  # real resolver
    with pytest.raises(ImageError, match="non-public address"):
        await fetcher.to_base64("http://localhost:9/x.png")
    assert transport.attempts == []


async def test_userinfo_does_not_hide_the_real_host() -> None:
    transport = NoConnect()
    fetcher = ImageFetcher(ImagePolicy(allow_remote=True), fake_resolver, transport)
    with pytest.raises(ImageError, match="cannot fetch"):
        await fetcher.to_base64("http://user:pw@10.0.0.1@images.test/x.png")
    assert transport.attempts == [(PUBLIC_IP, "images.test")]  # checked and dialled: the real host


class Handler(BaseHTTPRequestHandler):
    port = 0

    def do_GET(self) -> None:
        routes = {
            "/img": lambda: self._send(200, png_bytes("blue")),
            "/to-loopback": lambda: self._redirect(f"http://127.0.0.1:{self.port}/img"),
            "/to-localhost": lambda: self._redirect(f"http://localhost:{self.port}/img"),
            "/to-internal": lambda: self._redirect("http://internal.test/img"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/"),
            "/to-cdn": lambda: self._redirect(f"http://cdn.test:{self.port}/img"),
            "/to-gopher": lambda: self._redirect("gopher://images.test/"),
            "/loop": lambda: self._redirect("/loop"),
            "/big": lambda: self._send(200, b"\x89PNG" + b"0" * 5000),
            "/chunked-big": self._chunked_big,
            "/slow": lambda: (time.sleep(2), self._send(200, png_bytes())),
            "/text": lambda: self._send(200, b"<html>not an image</html>"),
            "/missing": lambda: self._send(404, b"nope"),
        }
        try:
            routes[self.path]()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetcher hung up early (byte cap, timeout): what is being tested

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("location", location)
        self.send_header("content-length", "0")
        self.end_headers()

    def _chunked_big(self) -> None:
        self.send_response(200)
        self.end_headers()  # no content-length: read until close
        for _ in range(10):
            self.wfile.write(b"x" * 1000)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def local_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    Handler.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Handler.port
    server.shutdown()
    server.server_close()


class PublicToLocal(httpx.AsyncBaseTransport):
    """Connects the two made-up public IPs to the local server; any other destination fails."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        assert host in (PUBLIC_IP, CDN_IP), f"the fetcher tried to connect to {host}"
        self.seen.append((host, request.headers["host"]))
        request.url = request.url.copy_with(host="127.0.0.1", port=self.port)
        return await self.inner.handle_async_request(request)


def _fetcher(port: int, **policy: object) -> tuple[ImageFetcher, PublicToLocal]:
    transport = PublicToLocal(port)
    settings = {"allow_remote": True, "max_bytes": 2000, "timeout": 1.0, **policy}
    return ImageFetcher(ImagePolicy(**settings), fake_resolver, transport), transport  # type: ignore[arg-type]


async def test_public_fetch_is_pinned_to_the_checked_address(local_server: int) -> None:
    fetcher, transport = _fetcher(local_server)
    got = await fetcher.to_base64(f"http://images.test:{local_server}/img")
    assert base64.b64decode(got) == png_bytes("blue")
    assert transport.seen == [(PUBLIC_IP, f"images.test:{local_server}")]  # IP dialled, Host kept
    got = await fetcher.to_base64(f"http://images.test:{local_server}/to-cdn")  # redirect to public
    assert base64.b64decode(got) == png_bytes("blue")
    assert transport.seen[-1] == (CDN_IP, f"cdn.test:{local_server}")


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("/to-loopback", ImageError, "non-public address \\(127.0.0.1\\)"),
        ("/to-localhost", ImageError, "non-public address \\(127.0.0.1, ::1\\)"),
        ("/to-internal", ImageError, "non-public address \\(10.0.0.1\\)"),
        ("/to-metadata", ImageError, "169.254.169.254"),
        ("/to-gopher", ImageError, "unsupported URL"),
        ("/loop", ImageError, "redirected more than 3 times"),
        ("/big", ImageTooLarge, "5004 bytes, limit 2000"),
        ("/chunked-big", ImageTooLarge, "over the 2000-byte limit"),
        ("/slow", ImageError, "took over 1s"),
        ("/text", ImageError, "not a recognisable image"),
        ("/missing", ImageError, "HTTP 404"),
    ],
)
async def test_remote_refusals(local_server: int, path: str, error: type[Exception], match: str) -> None:
    fetcher, transport = _fetcher(local_server)
    with pytest.raises(error, match=match):
        await fetcher.to_base64(f"http://images.test:{local_server}{path}")
    assert all(ip == PUBLIC_IP for ip, _ in transport.seen)  # never dialled anything else
