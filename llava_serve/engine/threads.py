"""ThreadTuner: picks torch's intra-op thread count for the model thread by timing its own work.

Every parallel region waits for its slowest thread. On a CPU shared with other work (other
processes, or the worker's own event loop and image preprocessing), a thread that is switched
out stalls every region it takes part in, and a forward pass has hundreds of them: measured on
a 2-core machine next to a 2-thread training job, a one-row decode step took 57 ms on one thread
and ~700 ms on two; on the idle machine two threads win (97 vs 151 ms for 16 rows). So the engine
measures instead of guessing. Work comes in kinds whose timings are comparable: decode steps of
the same batch size, and prefills per prompt token. Every `period` operations of a kind the tuner
runs the next few at each candidate count in turn (dropping a candidate after one try when it is
clearly slower, so a bad probe costs one operation), keeps the fastest, and backs off while the
choice holds. Other jobs come and go, so the period stays short.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

CLEARLY_SLOWER = 1.5  # a candidate this much slower than the current count is dropped after one try
SWITCH_MARGIN = 0.9  # switch only for a >10% faster operation, so noise does not flip the choice


class ThreadTuner:
    def __init__(
        self,
        max_threads: int,
        rounds: int = 2,
        min_period: int = 8,
        max_period: int = 64,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.candidates = sorted({1, max(1, max_threads // 2), max_threads})
        self.enabled = len(self.candidates) > 1
        self.current = max_threads
        self.rounds = rounds
        self.min_period = min_period
        self.max_period = max_period
        self.period = min_period
        self.since_probe = min_period  # probe at the first operations
        self.probe_key: Hashable = None
        self.plan: list[int] = []  # thread counts still to time in this probe, in order
        self.samples: dict[int, list[float]] = {}
        self.foreign = 0  # operations of other kinds since this probe began
        self._set_threads = set_threads
        self._applied: int | None = None

    @contextmanager
    def timed(self, key: Hashable, units: int = 1) -> Iterator[None]:
        """Run one operation of kind `key` (`units` of work, e.g. prompt tokens) at the chosen count."""
        self.begin(key)
        started = time.perf_counter()
        yield
        self.end(key, (time.perf_counter() - started) / max(1, units))

    def begin(self, key: Hashable) -> None:
        if not self.enabled:
            return
        if not self.plan and self.since_probe >= self.period:
            others = [c for c in self.candidates if c != self.current]
            self.plan = [self.current, *others] * self.rounds
            self.samples, self.probe_key, self.foreign = {}, key, 0
        probing = self.plan and key == self.probe_key
        self._apply(self.plan[0] if probing else self.current)

    def end(self, key: Hashable, seconds: float) -> None:
        if not self.enabled:
            return
        if not self.plan:
            self.since_probe += 1
        elif key == self.probe_key:
            self._record(seconds)
        elif _kind(key) == _kind(self.probe_key):  # the batch changed under the probe: try again soon
            self._abandon(self.period // 2)
        else:
            self.foreign += 1
            if self.foreign >= self.min_period:  # no more of the probed kind: probe what runs now
                self._abandon(self.period)

    def idle(self) -> None:
        """The engine ran out of work: conditions may differ when it resumes, so probe at once."""
        if not self.plan:
            self.since_probe = max(self.since_probe, self.period)

    def _abandon(self, since_probe: int) -> None:
        self.plan = []
        self.since_probe = since_probe

    def _record(self, seconds: float) -> None:
        threads = self.plan.pop(0)
        self.samples.setdefault(threads, []).append(seconds)
        base = self.samples.get(self.current)
        if threads != self.current and base and seconds > CLEARLY_SLOWER * min(base):
            self.plan = [c for c in self.plan if c != threads]
        if not any(c != self.current for c in self.plan):
            self.plan = []
            self._decide()

    def _decide(self) -> None:
        fastest = {c: min(times) for c, times in self.samples.items()}
        best = min(fastest, key=fastest.__getitem__)
        if best != self.current and fastest[best] < SWITCH_MARGIN * fastest[self.current]:
            self.current, self.period = best, self.min_period
        else:
            self.period = min(2 * self.period, self.max_period)
        self.since_probe = 0

    def _apply(self, threads: int) -> None:
        if threads != self._applied:
            self._set_threads(threads)
            self._applied = threads


def _kind(key: Hashable) -> Hashable:
    return key[0] if isinstance(key, tuple) and key else key
