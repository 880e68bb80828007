"""Image URLs of chat requests, turned into the base64 strings workers take.

`data:` URLs are always accepted. http(s) URLs only when the operator allows remote images, and
then only to public addresses: the API resolves the host itself, refuses if any address is
private, loopback, link-local, multicast, reserved or otherwise not global (IPv6 too, including
IPv4-mapped/6to4/Teredo forms), connects to the address it checked (so DNS cannot change the
answer in between), follows redirects by hand re-checking each, and caps time and bytes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from llava_serve.errors import ImageError, ImageTooLarge

Resolver = Callable[[str, int], Awaitable[list[str]]]
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImagePolicy:
    allow_remote: bool = False
    max_bytes: int = 10 * 1024 * 1024
    timeout: float = 10.0
    max_redirects: int = 3


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_public_address(ip: str) -> bool:
    """True only for globally routable unicast addresses."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = [addr.ipv4_mapped, addr.sixtofour, *(addr.teredo or ())]
        if any(v4 is not None and not is_public_address(str(v4)) for v4 in embedded):
            return False
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


class ImageFetcher:
    """Resolves image URLs to base64; `resolver` and `transport` are injectable for tests."""

    def __init__(
        self,
        policy: ImagePolicy,
        resolver: Resolver = system_resolver,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        # No keep-alive: a pooled TLS connection checked for one host name must not serve another
        # host that resolves to the same address.
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=policy.timeout,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def to_base64(self, url: str) -> str:
        """The image as the base64 the worker decodes. An inline image is passed on as sent (the
        worker decodes and checks it); only a fetched one is encoded here."""
        url = url.strip()
        if url[:5].lower() == "data:":
            return data_url_payload(url, self.policy.max_bytes)
        if urlsplit(url).scheme.lower() in ("http", "https"):
            raw = await self._fetch_remote(url)
            await asyncio.to_thread(check_is_image, raw)
            return base64.b64encode(raw).decode()
        raise ImageError(f"unsupported image URL {_short(url)}: use a data: URL or http(s)")

    async def _fetch_remote(self, url: str) -> bytes:
        if not self.policy.allow_remote:
            raise ImageError(
                "remote image URLs are disabled on this server; send the image inline as a "
                "data:image/...;base64 URL (the operator can enable --allow-remote-images)"
            )
        try:
            return await asyncio.wait_for(self._follow(url), self.policy.timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise ImageError(f"fetching image {_short(url)} took over {self.policy.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot fetch image {_short(url)}: {type(exc).__name__}") from None

    async def _follow(self, url: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            pinned_url, host_header, sni = await self._pinned(url)
            headers, extensions = {"host": host_header}, {"sni_hostname": sni}
            async with self.client.stream("GET", pinned_url, headers=headers, extensions=extensions) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    url = urljoin(url, resp.headers["location"])
                    continue
                if resp.status_code != 200:
                    raise ImageError(f"fetching image {_short(url)} answered HTTP {resp.status_code}")
                return await self._read_capped(resp, url)
        raise ImageError(f"image URL redirected more than {self.policy.max_redirects} times")

    async def _pinned(self, url: str) -> tuple[str, str, str]:
        """The URL rewritten to a vetted IP of its host, the Host header and the TLS name."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ImageError(f"image redirect to an unsupported URL {_short(url)}")
        host = parts.hostname
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        ip = await self._public_ip(host, port)
        netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        host_header = parts.netloc.rpartition("@")[2]  # userinfo is never forwarded
        return parts._replace(netloc=netloc).geturl(), host_header, host

    async def _public_ip(self, host: str, port: int) -> str:
        try:
            ips = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                ips = await self.resolver(host, port)
            except OSError as exc:
                raise ImageError(f"cannot resolve image host {host!r}: {exc}") from None
        refused = [ip for ip in ips if not is_public_address(ip)]
        if not ips or refused:
            raise ImageError(
                f"image host {host!r} resolves to a non-public address ({', '.join(refused) or 'none'}); "
                "only public internet addresses may be fetched"
            )
        return ips[0]

    async def _read_capped(self, resp: httpx.Response, url: str) -> bytes:
        cap = self.policy.max_bytes
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise ImageTooLarge(f"image {_short(url)} is {declared} bytes, limit {cap}")
        data = bytearray()
        async for chunk in resp.aiter_bytes():
            data += chunk
            if len(data) > cap:
                raise ImageTooLarge(f"image {_short(url)} is over the {cap}-byte limit")
        return bytes(data)


def data_url_payload(url: str, max_bytes: int) -> str:
    """The base64 payload of an image data: URL (line breaks removed), checked for shape and size."""
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError("image data: URL must look like data:image/png;base64,<data>")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data: URL has media type {mime!r}, not an image")
    payload = "".join(url[match.end() :].split())
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"inline image is over the {max_bytes}-byte limit")
    if not payload or _BASE64.fullmatch(payload) is None:
        raise ImageError("inline image is not valid base64")
    return payload


def check_is_image(raw: bytes) -> None:
    """Cheap sniff (header only); the worker decodes fully, with its own pixel limits."""
    if not raw:
        raise ImageError("image is empty")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.size  # noqa: B018 - parsing the header is the check
    except Image.DecompressionBombError as exc:  # a real image, with far too many pixels
        raise ImageTooLarge(f"image has too many pixels to decode safely ({exc}); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError("image data is not a recognisable image (PNG, JPEG, WebP, GIF, ...)") from None


def _short(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
