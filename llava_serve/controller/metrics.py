"""Prometheus metrics of one controller (own CollectorRegistry: no process-wide state)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from llava_serve.controller.registry import Registry


class ControllerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: Registry) -> None:
        self.collectors = CollectorRegistry()
        workers = Gauge("llava_controller_workers", "Registered workers", registry=self.collectors)
        workers.set_function(lambda: len(registry))
        healthy = Gauge("llava_controller_healthy_workers", "Workers in rotation", registry=self.collectors)
        healthy.set_function(lambda: sum(w.healthy for w in registry.workers()))
        self.dispatches = Counter(
            "llava_controller_dispatches", "Requests sent to a worker", ["model"], registry=self.collectors
        )
        self.proxy_errors = Counter(
            "llava_controller_proxy_errors",
            "Worker failures seen by the proxy (connect: before the first byte; midstream: after)",
            ["kind"],
            registry=self.collectors,
        )
        self.retries = Counter(
            "llava_controller_retries", "Requests retried on another worker", registry=self.collectors
        )
        self.no_worker = Counter(
            "llava_controller_no_worker",
            "Requests refused: no worker for the model",
            registry=self.collectors,
        )

    def render(self) -> bytes:
        return generate_latest(self.collectors)
