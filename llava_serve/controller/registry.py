"""The controller's registry of workers: pure state, an injectable clock, no I/O.

Touched only from the event loop, so it needs no lock. A worker is *healthy* until a connection
to it fails; it then stays out of rotation until its next heartbeat or registration, and is
dropped altogether when its heartbeats stop for `expiration` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llava_serve.errors import RegistryFull
from llava_serve.protocol.worker import WorkerStatus

Clock = Callable[[], float]


@dataclass
class WorkerInfo:
    name: str
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float
    healthy: bool = True
    multimodal: bool = False  # as the worker said at registration (FastChat's flag)

    @property
    def load(self) -> float:
        """LLaVA's shortest-queue measure: waiting work per unit of speed."""
        return self.queue_length / self.speed


class Registry:
    def __init__(
        self, expiration: float, clock: Clock | None = None, max_workers: int = 256, warmup: float = 0.0
    ) -> None:
        self.expiration = expiration
        self.max_workers = max_workers
        self.warmup = warmup
        self._clock = clock or time.monotonic
        self._workers: dict[str, WorkerInfo] = {}
        self.started_at = self._clock()

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, name: str) -> bool:
        return name in self._workers

    def get(self, name: str) -> WorkerInfo | None:
        return self._workers.get(name)

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def register(
        self, name: str, status: WorkerStatus, check_heart_beat: bool = True, multimodal: bool = False
    ) -> None:
        """Add or update `name`; RegistryFull when it is new and max_workers are registered."""
        if name not in self._workers and len(self._workers) >= self.max_workers:
            raise RegistryFull(
                f"the controller already has {self.max_workers} workers registered (--max-workers)",
                retry_after=self.expiration,
            )
        self._workers[name] = WorkerInfo(
            name=name,
            model_names=list(status.model_names),
            speed=status.speed if status.speed > 0 else 1.0,
            queue_length=status.queue_length,
            check_heart_beat=check_heart_beat,
            last_heart_beat=self._clock(),
            multimodal=multimodal,
        )

    def heart_beat(self, name: str, queue_length: int) -> bool:
        """Record a heartbeat; False for an unknown worker (it should re-register)."""
        info = self._workers.get(name)
        if info is None:
            return False
        info.queue_length = queue_length
        info.last_heart_beat = self._clock()
        info.healthy = True
        return True

    def unregister(self, name: str) -> bool:
        return self._workers.pop(name, None) is not None

    def mark_unhealthy(self, name: str) -> None:
        info = self._workers.get(name)
        if info is not None:
            info.healthy = False

    def note_dispatch(self, name: str) -> None:
        """Count a request sent to `name` until its next heartbeat reports the real queue."""
        info = self._workers.get(name)
        if info is not None:
            info.queue_length += 1

    def expire(self) -> list[str]:
        """Drop workers whose heartbeats stopped; returns their names."""
        deadline = self._clock() - self.expiration
        stale = [w.name for w in self._workers.values() if w.check_heart_beat and w.last_heart_beat < deadline]
        for name in stale:
            del self._workers[name]
        return stale

    def candidates(self, model: str, exclude: Iterable[str] = ()) -> list[WorkerInfo]:
        """Healthy workers serving `model`, minus `exclude`."""
        skip = set(exclude)
        return [w for w in self._workers.values() if w.healthy and model in w.model_names and w.name not in skip]

    def warming_up(self) -> bool:
        """True for `warmup` seconds after the start: after a restart, workers come back one by one
        as their next heartbeat finds them unknown, so a model missing now may be back shortly."""
        return self._clock() - self.started_at < self.warmup

    def model_names(self) -> list[str]:
        """Models of all registered workers, sorted (as LLaVA lists them).

        A model whose workers are all out of rotation stays listed until they expire, so clients
        can tell "no worker right now" (503) from "no such model" (404).
        """
        return sorted({m for w in self._workers.values() for m in w.model_names})

    def model_names_of(self, multimodal: bool) -> list[str]:
        """FastChat's /list_multimodal_models and /list_language_models: by the workers' flag."""
        return sorted({m for w in self._workers.values() if w.multimodal == multimodal for m in w.model_names})

    def aggregate_status(self) -> WorkerStatus:
        healthy = [w for w in self._workers.values() if w.healthy]
        return WorkerStatus(
            model_names=sorted({m for w in healthy for m in w.model_names}),
            speed=sum(w.speed for w in healthy),
            queue_length=sum(w.queue_length for w in healthy),
        )
