"""Choosing a worker for a request: LLaVA's shortest_queue and lottery, plus power_of_two."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from llava_serve.controller.registry import Registry, WorkerInfo

Method = Callable[[Sequence[WorkerInfo], random.Random], WorkerInfo]


def shortest_queue(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    """Least queue_length / speed; ties broken at random so equal workers share the load."""
    best = min(w.load for w in workers)
    return rng.choice([w for w in workers if w.load == best])


def lottery(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    """A random worker, weighted by speed."""
    return rng.choices(list(workers), weights=[w.speed for w in workers])[0]


def power_of_two(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    """The less loaded of two workers drawn at random (cheap, and avoids herding on stale queues)."""
    if len(workers) == 1:
        return workers[0]
    a, b = rng.sample(list(workers), 2)
    return b if b.load < a.load else a


METHODS: dict[str, Method] = {
    "shortest_queue": shortest_queue,
    "lottery": lottery,
    "power_of_two": power_of_two,
}


class Dispatcher:
    """Picks a healthy worker for a model with the configured method."""

    def __init__(self, registry: Registry, method: str, rng: random.Random | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown dispatch method {method!r}; choose from {sorted(METHODS)}")
        self.registry = registry
        self.method = METHODS[method]
        self.rng = rng or random.Random()

    def choose(self, model: str, exclude: Iterable[str] = ()) -> WorkerInfo | None:
        """A worker for `model` (not in `exclude`), counted as one more in its queue; None if none."""
        worker = self.peek(model, exclude)
        if worker is not None:
            self.registry.note_dispatch(worker.name)
        return worker

    def peek(self, model: str, exclude: Iterable[str] = ()) -> WorkerInfo | None:
        """The worker `choose` would pick, without counting a dispatch (an address lookup)."""
        workers = self.registry.candidates(model, exclude)
        return self.method(workers, self.rng) if workers else None
