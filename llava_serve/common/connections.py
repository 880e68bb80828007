"""Connection limits for every service's uvicorn: what nginx does by default, which uvicorn does not.

uvicorn never reaps a connection that has not sent a complete request: 800 idle, slowloris (a header
byte now and then) and slow-body connections were all still open after 75 s, and 1,100 idle ones
exhausted the controller's file descriptors (every request then timed out, heartbeats failed).
`GuardedH11` closes a connection whose request head is not complete `header_timeout` seconds after
it opened (or after the previous response), one whose body stalls for `body_timeout` seconds, and
any connection past `max_connections`.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
from dataclasses import dataclass, fields
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0  # nginx client_header_timeout: 60 s
    body_timeout: float = 30.0  # between two reads of a body (nginx client_body_timeout: 60 s)
    keep_alive: int = 5  # idle keep-alive connection closed after this many seconds
    max_connections: int = 1000

    def __post_init__(self) -> None:
        if min(self.header_timeout, self.body_timeout, self.keep_alive) <= 0 or self.max_connections < 1:
            raise ValueError("connection timeouts must be > 0 and --max-connections >= 1")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """http protocol, keep-alive and concurrency settings for uvicorn.run / uvicorn.Config."""
        raise_fd_limit(self.max_connections + 256)
        protocol = type("GuardedH11", (GuardedH11,), {"limits": self})
        # limit_concurrency: requests past it get 503 (it counts connections and running requests)
        return {"http": protocol, "timeout_keep_alive": self.keep_alive, "limit_concurrency": self.max_connections}


def add_connection_args(p: argparse.ArgumentParser) -> None:
    d = ConnectionLimits()
    p.add_argument("--header-timeout", type=float, default=d.header_timeout, help="seconds to send a request head")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout, help="seconds a request body may stall")
    p.add_argument("--keep-alive", type=int, default=d.keep_alive, help="seconds an idle connection is kept")
    p.add_argument("--max-connections", type=int, default=d.max_connections, help="open connections at most")


def pop_connection_limits(values: dict[str, Any]) -> ConnectionLimits:
    """The limits among parsed CLI values, removed from `values`."""
    return ConnectionLimits(**{f.name: values.pop(f.name) for f in fields(ConnectionLimits) if f.name in values})


def raise_fd_limit(wanted: int) -> None:
    """Let the soft open-file limit reach `wanted` (up to the hard limit), so the connection cap, not
    the fd limit, is what a flood of connections meets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class GuardedH11(H11Protocol):
    limits = ConnectionLimits()
    _timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused, self.transport = True, transport
            transport.close()  # over the cap: the fd is released at once, nothing is read
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm(self.limits.body_timeout)  # per read: a body that keeps coming is fine
        elif state is not h11.IDLE:
            self._disarm()  # the whole request is in; the app runs as long as it takes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._arm(self.limits.header_timeout)  # the next request head, if any, has this long

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._reap)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _reap(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (checked before anything is started)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
