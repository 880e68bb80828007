"""Running a service: logging set-up, an exposure warning, uvicorn. Called from `main()` only."""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

import uvicorn

from llava_serve.common.connections import ConnectionLimits

# Loggers whose records a client can cause one per request (uvicorn's "Exception in ASGI application"
# traceback, "Invalid HTTP request received", our own warnings): rate-limited, per message.
RATE_LIMITED = ("uvicorn.error", "llava_serve")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    rate_limit_logs()


def rate_limit_logs(burst: int = 20, per_seconds: float = 60.0) -> None:
    """At most `burst` records of one message template per `per_seconds` from each logger in RATE_LIMITED
    (a client that left mid-body cost the controller a 4.6 KB traceback each, 124 MB of log in 15 s)."""
    for name in RATE_LIMITED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(burst, per_seconds))


class RateLimit(logging.Filter):
    def __init__(self, burst: int, per_seconds: float) -> None:
        super().__init__()
        self.burst, self.per_seconds = burst, per_seconds
        self._windows: dict[tuple[str, object], list[float]] = {}  # key -> [window start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.per_seconds:
            if len(self._windows) > 10_000:
                self._windows.clear()  # bounded: templates, not messages, are the keys
            dropped = int(window[2]) if window else 0
            self._windows[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} [{dropped} similar messages suppressed]"
            return True
        window[1] += 1
        if window[1] <= self.burst:
            return True
        window[2] += 1
        return False


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(logger: logging.Logger, host: str, api_keys: tuple[str, ...]) -> None:
    if not is_loopback_host(host) and not api_keys:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", host)


def uvicorn_config(app: Any, host: str, port: int, log_level: str, limits: ConnectionLimits) -> uvicorn.Config:
    # A short grace period: open streams must not hold a restart up for long. The asyncio loop, named:
    # uvicorn would pick uvloop wherever it is installed (the `ray` extra brings it), and the services
    # should run, and measure, the same with or without that extra.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        loop="asyncio",
        timeout_graceful_shutdown=5,
        **limits.uvicorn_kwargs(),
    )
    rate_limit_logs()  # after uvicorn has set up its loggers
    return config


def run_app(app: Any, host: str, port: int, log_level: str, limits: ConnectionLimits | None = None) -> None:
    uvicorn.Server(uvicorn_config(app, host, port, log_level, limits or ConnectionLimits())).run()
