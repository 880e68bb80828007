"""A whole llava-serve cluster as real processes on fixed free ports, so any piece can be killed and
restarted in place: controller, N model workers (tiny random LLaVA), OpenAI API.

Processes are only ever signalled through their own pid (tests/procs.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.procs import Proc, free_port, spawn, wait_ready

MODEL = "tiny-llava"


@dataclass
class StackConfig:
    model_path: Path
    workers: int = 2
    heart_beat_interval: float = 1.0
    heart_beat_expiration: float = 3.0
    limit_model_concurrency: int = 4
    max_queue: int = 8
    api: bool = True
    controller_extra: tuple[str, ...] = ()
    worker_extra: tuple[str, ...] = ()
    api_extra: tuple[str, ...] = ()
    # credentials: client keys for each service, and the workers' registration secret
    controller_key: str | None = None
    worker_key: str | None = None
    api_key: str | None = None
    secret: str | None = None


@dataclass
class Stack:
    config: StackConfig
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    fresh: dict[str, dict[str, int]] = field(default_factory=dict)  # for tests: figures after start
    baseline: dict[str, dict[str, int]] = field(default_factory=dict)  # for tests: figures at rest

    # -- addresses ---------------------------------------------------------------------------
    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def service_ports(self) -> frozenset[int]:
        return frozenset(self.ports.values())

    @property
    def worker_names(self) -> list[str]:
        return [f"w{i}" for i in range(self.config.workers)]

    @property
    def auth(self) -> httpx.Auth:
        """For httpx clients: each request carries the key of the service it goes to."""
        return ServiceKeys(self)

    def name_at(self, port: int | None) -> str | None:
        return next((name for name, p in self.ports.items() if p == port), None)

    def headers(self, name: str) -> dict[str, str]:
        key = {"controller": self.config.controller_key, "api": self.config.api_key}.get(name, self.config.worker_key)
        return {"authorization": f"Bearer {key}"} if key else {}

    # -- argv --------------------------------------------------------------------------------
    def argv(self, name: str) -> list[str]:
        c = self.config
        port = str(self.ports[name])
        if name == "controller":
            argv = ["llava_serve.controller", "--port", port, "--log-level", "warning",
                    "--heart-beat-interval", str(c.heart_beat_interval),
                    "--heart-beat-expiration", str(c.heart_beat_expiration),
                    "--expiry-check-interval", "0.5", *c.controller_extra]  # fmt: skip
            argv += ["--api-key", c.controller_key] if c.controller_key else []
            argv += ["--registration-secret", c.secret] if c.secret else []
            argv += ["--worker-api-key", c.worker_key] if c.worker_key else []
            return argv
        if name == "api":
            argv = ["llava_serve.openai_api", "--port", port, "--log-level", "warning",
                    "--controller-address", self.url("controller"), *c.api_extra]  # fmt: skip
            argv += ["--api-key", c.api_key] if c.api_key else []
            argv += ["--controller-api-key", c.controller_key] if c.controller_key else []
            return argv
        argv = ["llava_serve.model_worker", "--model-path", str(c.model_path), "--model-name", MODEL,
                "--device", "cpu", "--port", port, "--worker-address", self.url(name),
                "--controller-address", self.url("controller"), "--log-level", "warning",
                "--heart-beat-interval", str(c.heart_beat_interval),
                "--limit-model-concurrency", str(c.limit_model_concurrency),
                "--max-queue", str(c.max_queue), "--shutdown-grace", "2", *c.worker_extra]  # fmt: skip
        argv += ["--api-key", c.worker_key] if c.worker_key else []
        argv += ["--registration-secret", c.secret] if c.secret else []
        return argv

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> Stack:
        names = ["controller", *self.worker_names] + (["api"] if self.config.api else [])
        self.ports = {name: free_port() for name in names}
        for name in names:  # all at once: model loading overlaps
            self.procs[name] = spawn(self.argv(name), self.ports[name])
        try:
            for name in names:
                wait_ready(self.procs[name], self.ready_path(name), timeout=120)
            self.wait_registered(self.config.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, name: str) -> float:
        """Start `name` again on its port (after it died); seconds until it answers its ready route."""
        old = self.procs.get(name)
        if old is not None:
            old.stop()
        t0 = time.monotonic()
        self.procs[name] = spawn(self.argv(name), self.ports[name])
        wait_ready(self.procs[name], self.ready_path(name), timeout=120)
        return time.monotonic() - t0

    def ready_path(self, name: str) -> str:
        """A worker's /ready needs its key when it has one; its /health answers once the model is
        loaded and the engine started (the server starts after both)."""
        return "/ready" if name.startswith("w") and not self.config.worker_key else "/health"

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    # -- views of the cluster ----------------------------------------------------------------
    def controller_status(self) -> dict:  # type: ignore[type-arg]
        return httpx.post(
            self.url("controller") + "/worker_get_status", headers=self.headers("controller"), timeout=5
        ).json()

    def workers_in_rotation(self) -> float:
        try:
            return float(self.controller_status()["speed"])
        except httpx.HTTPError:
            return -1.0

    def wait_registered(self, n: int, timeout: float = 30.0) -> float:
        t0 = time.monotonic()
        while self.workers_in_rotation() != n:
            assert time.monotonic() - t0 < timeout, f"{n} workers not registered after {timeout}s"
            time.sleep(0.05)
        return time.monotonic() - t0

    def queue_lengths(self) -> dict[str, int]:
        out = {}
        for name in self.worker_names:
            resp = httpx.post(self.url(name) + "/worker_get_status", headers=self.headers(name), timeout=5)
            out[name] = int(resp.json()["queue_length"])
        return out

    def wait_idle(self, timeout: float = 20.0) -> float:
        """Seconds until every worker's queue_length is 0."""
        t0 = time.monotonic()
        while any(self.queue_lengths().values()):
            assert time.monotonic() - t0 < timeout, f"queue_length stuck at {self.queue_lengths()}"
            time.sleep(0.05)
        return time.monotonic() - t0


class ServiceKeys(httpx.Auth):
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        name = self.stack.name_at(request.url.port)
        if name is not None and "authorization" not in request.headers:
            request.headers.update(self.stack.headers(name))
        yield request
