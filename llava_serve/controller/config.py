"""The controller's settings: one frozen dataclass, validated; the CLI is built from it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from llava_serve.common.attest import SECRET_ENV
from llava_serve.common.connections import ConnectionLimits, add_connection_args, pop_connection_limits
from llava_serve.controller.dispatch import METHODS


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 21001
    dispatch_method: str = "shortest_queue"
    heart_beat_expiration: float = 30.0
    # Workers send a heartbeat this often; the controller only reports it to them.
    heart_beat_interval: float = 15.0
    expiry_check_interval: float = 3.0
    registration_secret: str | None = None
    api_keys: tuple[str, ...] = field(default=())
    # Bearer key the controller sends to workers that require one.
    worker_api_key: str | None = None
    connect_timeout: float = 5.0
    # Longest silence allowed from a worker (before its answer, or between frames).
    worker_timeout: float = 100.0
    max_tries: int = 3
    # Largest request body read (a worker's default limit is about 230 MB: 8 images of 20 MB).
    max_body_bytes: int = 256 * 1024 * 1024
    # Registrations held at once (each costs a little memory and a status check).
    max_workers: int = 256
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.dispatch_method not in METHODS:
            raise ValueError(f"--dispatch-method must be one of {sorted(METHODS)}")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be 1..65535")
        for name in ("heart_beat_expiration", "heart_beat_interval", "expiry_check_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.heart_beat_expiration <= self.heart_beat_interval:
            raise ValueError("--heart-beat-expiration must exceed --heart-beat-interval")
        if self.connect_timeout <= 0 or self.worker_timeout <= 0 or self.max_tries < 1:
            raise ValueError("timeouts must be > 0 and --max-tries >= 1")
        if self.max_body_bytes < 1:
            raise ValueError("--max-body-bytes must be >= 1")
        if self.max_workers < 1:
            raise ValueError("--max-workers must be >= 1")
        if self.worker_api_key and not self.registration_secret:
            # the key goes only to workers that proved they hold the secret; without one, none can
            raise ValueError("--worker-api-key needs --registration-secret (or $" + SECRET_ENV + ")")


def build_parser() -> argparse.ArgumentParser:
    d = ControllerConfig()
    p = argparse.ArgumentParser(prog="llava-serve controller", description="Registry and dispatcher of workers.")
    p.add_argument("--host", default=d.host, help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--dispatch-method", choices=sorted(METHODS), default=d.dispatch_method)
    p.add_argument("--heart-beat-expiration", type=float, default=d.heart_beat_expiration)
    p.add_argument("--heart-beat-interval", type=float, default=d.heart_beat_interval)
    p.add_argument("--expiry-check-interval", type=float, default=d.expiry_check_interval)
    p.add_argument(
        "--registration-secret",
        default=os.environ.get(SECRET_ENV) or None,
        help=f"workers must send it as X-Registration-Secret and prove they hold it (default: ${SECRET_ENV}); "
        "without one, only workers on this machine may register",
    )
    p.add_argument("--api-key", action="append", default=[], help="accepted client key (repeatable)")
    p.add_argument("--worker-api-key", help="bearer key sent to workers")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    p.add_argument("--worker-timeout", type=float, default=d.worker_timeout)
    p.add_argument("--max-tries", type=int, default=d.max_tries, help="workers tried per request")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body accepted")
    p.add_argument("--max-workers", type=int, default=d.max_workers, help="most workers registered at once")
    add_connection_args(p)
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    values = vars(args).copy()
    values["api_keys"] = tuple(values.pop("api_key"))
    connections = pop_connection_limits(values)
    return ControllerConfig(**values, connections=connections)
