"""Running a service: logging set-up, an exposure warning, uvicorn. Called from `main()` only."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import uvicorn


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise


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


def run_app(app: Any, host: str, port: int, log_level: str) -> None:
    # A short grace period: open streams must not hold a restart up for long.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
