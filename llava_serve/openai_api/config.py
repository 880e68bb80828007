"""The OpenAI API server's settings: one frozen dataclass, validated; the CLI is built from it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from llava_serve.common.connections import ConnectionLimits, add_connection_args, pop_connection_limits
from llava_serve.openai_api.images import ImagePolicy


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    controller_address: str = "http://localhost:21001"
    controller_api_key: str | None = None
    api_keys: tuple[str, ...] = field(default=())
    max_images_per_request: int = 8
    allow_remote_images: bool = False
    remote_image_timeout: float = 10.0
    max_image_bytes: int = 10 * 1024 * 1024
    max_n: int = 8
    # Longest silence allowed from the controller (before its answer, or between frames).
    upstream_timeout: float = 300.0
    # Largest request body read; None: room for the image limits (base64) plus 4 MiB (body_limit).
    max_body_bytes: int | None = None
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.controller_address.startswith(("http://", "https://")):
            raise ValueError("--controller-address must be an http(s) URL")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be 1..65535")
        if self.max_images_per_request < 0 or self.max_image_bytes <= 0 or self.max_n < 1:
            raise ValueError("--max-images-per-request >= 0, --max-image-bytes > 0 and --max-n >= 1")
        if self.remote_image_timeout <= 0 or self.upstream_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        if self.max_body_bytes is not None and self.max_body_bytes < 1:
            raise ValueError("--max-body-bytes must be >= 1")

    @property
    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_images_per_request * (self.max_image_bytes * 4 // 3 + 1024) + 4 * 1024 * 1024

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            allow_remote=self.allow_remote_images,
            max_bytes=self.max_image_bytes,
            timeout=self.remote_image_timeout,
        )


def build_parser() -> argparse.ArgumentParser:
    d = ApiConfig()
    p = argparse.ArgumentParser(prog="llava-serve api", description="OpenAI-compatible API server.")
    p.add_argument("--host", default=d.host, help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--controller-address", default=d.controller_address)
    p.add_argument("--controller-api-key", help="bearer key sent to the controller")
    p.add_argument("--api-key", action="append", default=[], help="accepted client key (repeatable)")
    p.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only); off: data: URLs only",
    )
    p.add_argument("--remote-image-timeout", type=float, default=d.remote_image_timeout)
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    p.add_argument("--max-n", type=int, default=d.max_n, help="largest n (choices per request)")
    p.add_argument("--upstream-timeout", type=float, default=d.upstream_timeout)
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default: images + 4 MiB)")
    add_connection_args(p)
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> ApiConfig:
    values = vars(args).copy()
    values["api_keys"] = tuple(values.pop("api_key"))
    connections = pop_connection_limits(values)
    return ApiConfig(**values, connections=connections)
