"""Shared pieces of the reliability suite: process figures from /proc, images, frames, waiting, results.

Figures a test measures go through `record(name, **figures)`: printed (pytest -s shows them) and,
when RELIABILITY_OUT names a folder, appended to RELIABILITY_OUT/figures.jsonl, which is where the
tables of docs/reliability.md come from.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

PROMPT = "A chat. USER: <image>\nWhat colour is the circle? ASSISTANT:"
FULL = os.environ.get("RELIABILITY_FULL") == "1"


def proc_figures(pid: int, service_ports: frozenset[int] = frozenset()) -> dict[str, int]:
    """RSS and peak RSS (KiB), threads, open file descriptors and TCP sockets of a live process.

    `pooled`: connections this process opened to one of `service_ports` and keeps (an HTTP
    client's keep-alive pool, bounded by its limits; httpx closes the ones a server dropped only
    when the pool is next used); `close_wait`: other connections the peer closed and this process
    never did (the usual shape of a leaked connection). `own_fds` = fds - pooled.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    fds = os.listdir(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    pooled = close_wait = 0
    for local, remote, state in _tcp_sockets(pid, inodes):
        outbound = remote in service_ports and local not in service_ports
        if outbound and state in ("01", "08"):  # a client pool's connection, idle or closed by the peer
            pooled += 1
        elif state == "08":
            close_wait += 1
    return {
        "rss_kib": fields["VmRSS"],
        "peak_rss_kib": fields["VmHWM"],
        "threads": fields["Threads"],
        "fds": len(fds),
        "pooled": pooled,
        "own_fds": len(fds) - pooled,
        "close_wait": close_wait,
    }


def _tcp_sockets(pid: int, inodes: set[str]) -> Iterator[tuple[int, int, str]]:
    """(local port, remote port, state) of this process's TCP sockets (state as in /proc/net/tcp)."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[9] in inodes:
                yield int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16), cols[3]


def leaks(before: dict[str, int], now: dict[str, int], thread_slack: int = 2) -> list[str]:
    """What is above its baseline: threads (beyond `thread_slack`), own fds (beyond 2), any CLOSE_WAIT."""
    out = []
    if now["threads"] > before["threads"] + thread_slack:
        out.append(f"threads {before['threads']} -> {now['threads']}")
    if now["own_fds"] > before["own_fds"] + 2:
        out.append(f"fds (pooled connections aside) {before['own_fds']} -> {now['own_fds']}")
    if now["close_wait"]:
        out.append(f"{now['close_wait']} sockets in CLOSE_WAIT")
    return out


def settled_figures(
    pids: dict[str, int],
    baseline: dict[str, dict[str, int]],
    service_ports: frozenset[int] = frozenset(),
    timeout: float = 15.0,
    thread_slack: int = 2,
    poke: Callable[[], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Figures once nothing is above `baseline` (see `leaks`), or after `timeout`.

    Idle pool threads and closing sockets take a moment to go; a leak never does. anyio retires a
    worker thread idle for 10 s only when the next job arrives: `poke` sends each service one.
    """
    deadline = time.monotonic() + timeout
    while True:
        if poke is not None:
            poke()
        now = {name: proc_figures(pid, service_ports) for name, pid in pids.items()}
        if not any(leaks(baseline[n], now[n], thread_slack) for n in now) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def png_bytes(colour: tuple[int, int, int] = (220, 30, 30), size: tuple[int, int] = (48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def png_b64(colour: tuple[int, int, int] = (220, 30, 30), size: tuple[int, int] = (48, 48)) -> str:
    return base64.b64encode(png_bytes(colour, size)).decode()


def data_url(colour: tuple[int, int, int] = (220, 30, 30)) -> str:
    return "data:image/png;base64," + png_b64(colour)


def split_frames(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(f) for f in raw.split(b"\0") if f.strip()]


def iter_frames(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    buf = b""
    for chunk in resp.iter_bytes():
        buf += chunk
        *done, buf = buf.split(b"\0")
        yield from (json.loads(f) for f in done if f)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> float:
    """Seconds until `predicate()` held (polling another process: there is no event to wait on)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what} not met within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


def queue_length(worker_url: str, headers: dict[str, str] | None = None) -> int:
    return int(httpx.post(worker_url + "/worker_get_status", headers=headers, timeout=5).json()["queue_length"])


def record(name: str, **figures: Any) -> None:
    line = {"test": name, **figures}
    print(f"\nFIGURES {json.dumps(line)}")
    out = os.environ.get("RELIABILITY_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "figures.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
