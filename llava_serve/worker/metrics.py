"""Prometheus metrics of one worker, in a registry of its own (no process globals)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llava_serve.engine.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llava_worker_requests", "Requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("llava_worker_generated_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "llava_worker_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llava_worker_inter_token_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        Gauge("llava_worker_running_requests", "Requests in the running batch", registry=r).set_function(running)
        Gauge("llava_worker_waiting_requests", "Requests waiting for a slot", registry=r).set_function(waiting)

    def accepted(self) -> None:
        self.requests.labels("accepted").inc()

    def finished(self, reason: str) -> None:
        self.requests.labels(reason).inc()

    def rejected(self, reason: str) -> None:
        self.requests.labels(f"rejected_{reason}").inc()

    async def timed(self, outputs: AsyncIterable[RequestOutput]) -> AsyncIterator[RequestOutput]:
        start = last = time.monotonic()
        seen = 0
        async for out in outputs:
            now = time.monotonic()
            new = out.completion_tokens - seen
            if new > 0:
                if seen == 0:
                    self.ttft.observe(now - start)
                else:
                    per_token = (now - last) / new
                    for _ in range(new):
                        self.itl.observe(per_token)
                self.tokens.inc(new)
                seen, last = out.completion_tokens, now
            yield out

    def render(self) -> bytes:
        return generate_latest(self.registry)
