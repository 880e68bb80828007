"""ThreadTuner: picks torch's intra-op thread count for the model thread by timing its own work.

Every parallel region waits for its slowest thread. On a CPU shared with other work (other
processes, or the worker's own event loop and image preprocessing), a thread that is switched
out stalls every region it takes part in, and a forward pass has hundreds of them: measured on
a 2-core machine next to a 2-thread training job, a one-row decode step took 57 ms on one thread
and ~700 ms on two; on the idle machine two threads win (97 vs 151 ms for 16 rows). So the engine
measures instead of guessing. Work comes in kinds whose timings are comparable (decode steps of
the same batch size; prefills per prompt token). From time to time the tuner runs the next few
operations of one kind at each candidate count in turn (dropping a candidate after one try when
it is clearly slower), keeps the fastest, and waits before probing again: longer while the choice
holds, and long enough that probing costs at most `budget` of the time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

CLEARLY_SLOWER = 1.5  # a candidate this much slower than the current count is dropped after one try
SWITCH_MARGIN = 0.9  # switch only for a >10% faster operation, so noise does not flip the choice
GIVE_UP_AFTER = 8  # operations of other kinds before a probe whose kind stopped coming is dropped


class ThreadTuner:
    def __init__(
        self,
        max_threads: int,
        rounds: int = 2,
        budget: float = 0.05,
        min_interval: float = 1.0,
        max_interval: float = 60.0,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.candidates = sorted({1, max(1, max_threads // 2), max_threads})
        self.enabled = len(self.candidates) > 1
        # start from all cores (torch's default, right on a machine that serves only this model);
        # on a busy machine the first probe, a few operations in, moves down
        self.current = self.candidates[-1]
        self.rounds = rounds
        self.budget = budget
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.interval = min_interval
        self.clock = clock
        self.next_probe = clock()  # probe at the first operations
        self.probe_key: Hashable = None
        self.plan: list[int] = []  # thread counts still to time in this probe, in order
        self.samples: dict[int, list[tuple[float, int]]] = {}  # count -> (seconds per unit, units)
        self.foreign = 0  # operations of other kinds since this probe began
        self._set_threads = set_threads
        self._applied: int | None = None

    @contextmanager
    def timed(self, key: Hashable, units: int = 1, probe: bool = True) -> Iterator[None]:
        """Run one operation of kind `key` (`units` of work, e.g. prompt tokens) at the chosen count;
        with probe=False it never starts a probe (an expensive operation to try a bad count on)."""
        self.begin(key, probe)
        started = self.clock()
        yield
        self.end(key, self.clock() - started, units)

    def begin(self, key: Hashable, probe: bool = True) -> None:
        if not self.enabled:
            return
        if not self.plan and probe and self.clock() >= self.next_probe:
            others = [c for c in self.candidates if c != self.current]
            self.plan = [self.current, *others] * self.rounds
            self.samples, self.probe_key, self.foreign = {}, key, 0
        probing = self.plan and key == self.probe_key
        self._apply(self.plan[0] if probing else self.current)

    def end(self, key: Hashable, seconds: float, units: int = 1) -> None:
        if not self.enabled or not self.plan:
            return
        if key == self.probe_key:
            self._record(seconds / max(1, units), max(1, units))
        elif _kind(key) == _kind(self.probe_key):  # the batch changed under the probe: try again soon
            self._abandon(self.interval / 2)
        else:
            self.foreign += 1
            if self.foreign >= GIVE_UP_AFTER:  # no more of the probed kind: probe what runs now
                self._abandon(0.0)

    def _record(self, per_unit: float, units: int) -> None:
        threads = self.plan.pop(0)
        self.samples.setdefault(threads, []).append((per_unit, units))
        base = self.samples.get(self.current)
        if threads != self.current and base and per_unit > CLEARLY_SLOWER * min(s for s, _ in base):
            self.plan = [c for c in self.plan if c != threads]
        if not any(c != self.current for c in self.plan):
            self.plan = []
            self._decide()

    def _decide(self) -> None:
        fastest = {c: min(s for s, _ in runs) for c, runs in self.samples.items()}
        best = min(fastest, key=fastest.__getitem__)
        if best != self.current and fastest[best] < SWITCH_MARGIN * fastest[self.current]:
            log.debug("intra-op threads %d -> %d (%s)", self.current, best, fastest)
            self.current, self.interval = best, self.min_interval
        else:
            best = self.current
            self.interval = min(2 * self.interval, self.max_interval)
        # time this probe lost against the best count, so probing stays within the budget
        lost = sum((s - fastest[best]) * n for runs in self.samples.values() for s, n in runs if s > fastest[best])
        self.next_probe = self.clock() + min(self.max_interval, max(self.interval, lost / self.budget))

    def _abandon(self, retry_in: float) -> None:
        """Stop probing; decide from what was timed if it covers more than one count."""
        self.plan = []
        if len(self.samples) > 1:
            self._decide()
        else:
            self.next_probe = self.clock() + retry_in

    def _apply(self, threads: int) -> None:
        if threads != self._applied:
            self._set_threads(threads)
            self._applied = threads


def _kind(key: Hashable) -> Hashable:
    return key[0] if isinstance(key, tuple) and key else key


def run_in_fresh_thread(fn: Callable[[], T], name: str = "llava-serve-load") -> T:
    """Run `fn` in a new thread, wait for it, return its result (or raise its exception).

    For one-off heavy torch work (loading a model, prepacking weights) in a process whose model
    then runs in another thread. PyTorch's CPU builds use GNU OpenMP, which gives every thread
    that runs a parallel region a team of worker threads, kept while that thread lives; while the
    process has more such threads than CPUs, libgomp lets them spin only ~100 times before
    sleeping, so each of the hundreds of parallel regions of a forward pass pays a futex wake-up.
    A model loaded in the main thread (which lives as long as the server) slowed the engine
    thread that way: on the 2-core machine, 84 bench-model-sized one-row linears took 31 ms in a
    thread after the main thread had run them, 24 ms after a thread like this one had (its team
    goes when it exits and is reused); through the worker, one streaming client went from 22 to
    28 tok/s.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    # a daemon: Ctrl-C in the caller's join ends the process at once, not after the load
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
