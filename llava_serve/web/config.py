"""The web demo's settings: one frozen dataclass, validated, with the CLI built from it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from llava_serve.cluster.client import ClusterClient
from llava_serve.common.connections import ConnectionLimits, add_connection_args, pop_connection_limits

ModelListMode = Literal["once", "reload"]


@dataclass(frozen=True)
class WebConfig:
    controller_url: str = "http://localhost:21001"
    controller_api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    # Chat answers streamed at the same time, over all browser sessions (Gradio's queue).
    concurrency_count: int = 16
    # "once": the model list is fetched on the first page load and kept (the refresh button
    # fetches it again); "reload": fetched again on every page load.
    model_list_mode: ModelListMode = "once"
    request_timeout: float = 20.0  # list models, worker address, prompt building
    stream_timeout: float = 120.0  # longest wait for the next frame of an answer
    max_image_side: int = 1344  # longer images are scaled down before they are sent
    max_upload_mb: int = 20
    # Uploads are deleted this many seconds after they arrive (and all of them when the demo stops).
    upload_max_age: int = 3600
    # Larger uploads are refused before they are decoded (Pillow's decompression-bomb limit).
    max_upload_pixels: int = 40_000_000
    # A file of `user:password` lines: the demo then asks for a login (Gradio's auth) on every page
    # and route but /health. None: open to anyone who can reach it.
    auth_file: str | None = None
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)

    def __post_init__(self) -> None:
        parts = urlsplit(self.controller_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--controller-url must be an http(s) URL, got {self.controller_url!r}")
        object.__setattr__(self, "controller_url", self.controller_url.rstrip("/"))
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.concurrency_count < 1:
            raise ValueError(f"--concurrency-count must be at least 1, got {self.concurrency_count}")
        if self.model_list_mode not in ("once", "reload"):
            raise ValueError(f"--model-list-mode must be 'once' or 'reload', got {self.model_list_mode!r}")
        if self.auth_file is not None:
            read_auth_file(self.auth_file)
        for name in (
            "request_timeout",
            "stream_timeout",
            "max_image_side",
            "max_upload_mb",
            "upload_max_age",
            "max_upload_pixels",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def build_parser() -> argparse.ArgumentParser:
    d = WebConfig()
    p = argparse.ArgumentParser(
        prog="llava-serve web", description="Gradio chat demo, a client of the llava-serve controller."
    )
    p.add_argument("--controller-url", default=d.controller_url, help="the controller's address")
    p.add_argument("--controller-api-key", default=None, help="bearer key, if the controller has --api-key")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--concurrency-count",
        type=int,
        default=d.concurrency_count,
        help="answers streamed at once, over all users",
    )
    p.add_argument(
        "--model-list-mode",
        choices=["once", "reload"],
        default=d.model_list_mode,
        help="fetch the model list once, or again on every page load",
    )
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds")
    p.add_argument(
        "--stream-timeout",
        type=float,
        default=d.stream_timeout,
        help="seconds to wait for the next piece of an answer",
    )
    p.add_argument(
        "--max-image-side",
        type=int,
        default=d.max_image_side,
        help="pixels; larger uploads are scaled down before sending",
    )
    p.add_argument("--max-upload-mb", type=int, default=d.max_upload_mb)
    p.add_argument("--upload-max-age", type=int, default=d.upload_max_age, help="seconds an uploaded file is kept")
    p.add_argument(
        "--max-upload-pixels", type=int, default=d.max_upload_pixels, help="largest image accepted, in pixels"
    )
    p.add_argument(
        "--auth-file",
        default=None,
        help="file of user:password lines; the demo then requires a login (default: no login)",
    )
    add_connection_args(p)
    return p


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """`user:password` per line (blank lines and # comments skipped); ValueError naming a bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"--auth-file {path}: {exc.strerror}") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth-file {path}, line {number}: expected user:password")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"--auth-file {path}: no user:password lines")
    return pairs


def config_from_args(argv: list[str] | None = None) -> WebConfig:
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    try:
        connections = pop_connection_limits(values)
        return WebConfig(**values, connections=connections)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers content


def cluster_client(config: WebConfig) -> ClusterClient:
    return ClusterClient(
        config.controller_url,
        config.controller_api_key,
        timeout=config.request_timeout,
        stream_timeout=config.stream_timeout,
    )
