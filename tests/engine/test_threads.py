"""ThreadTuner: keeps the thread count whose operations are fastest, and probes cheaply."""

from __future__ import annotations

from collections.abc import Hashable

from llava_serve.engine.threads import ThreadTuner

DECODE: Hashable = ("decode", 4)


class FakeMachine:
    """Time per operation for each thread count, a clock that advances by it, set_num_threads calls."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost = cost
        self.threads = max(cost)  # torch starts at its default
        self.now = 0.0
        self.calls: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.calls.append(n)

    def clock(self) -> float:
        return self.now

    def tuner(self, max_threads: int = 2) -> ThreadTuner:
        return ThreadTuner(max_threads, set_threads=self.set_threads, clock=self.clock)

    def run(self, tuner: ThreadTuner, steps: int, key: Hashable = DECODE, units: int = 1) -> list[int]:
        used = []
        for _ in range(steps):
            tuner.begin(key)
            used.append(self.threads)
            seconds = self.cost[self.threads] * units
            self.now += seconds
            tuner.end(key, seconds, units)
        return used


def test_single_thread_machine_is_left_alone() -> None:
    machine = FakeMachine({1: 1.0})
    tuner = machine.tuner(1)
    machine.run(tuner, 50)
    assert not tuner.enabled and machine.calls == []


def test_moves_to_one_thread_under_contention_and_back_when_quiet() -> None:
    machine = FakeMachine({1: 0.06, 2: 0.7})  # a busy neighbour: two threads stall
    tuner = machine.tuner()
    used = machine.run(tuner, 2000)
    assert tuner.current == 1
    slow_time = used[100:].count(2) * 0.7
    assert slow_time < 0.08 * (machine.now - 100 * 0.06), "probing stays within its time budget"
    machine.cost = {1: 0.15, 2: 0.097}  # the neighbour left
    machine.run(tuner, 1000)
    assert tuner.current == 2


def test_starts_on_all_cores_and_moves_down_on_a_busy_machine() -> None:
    machine = FakeMachine({1: 0.06, 2: 0.7})
    tuner = machine.tuner()
    used = machine.run(tuner, 200)
    assert used[0] == 2 and tuner.current == 1
    assert used[:8].count(1) >= 2, "the first probe comes at once"


def test_stays_on_all_cores_on_an_idle_machine() -> None:
    machine = FakeMachine({1: 0.151, 2: 0.097})
    tuner = machine.tuner()
    used = machine.run(tuner, 2000)
    assert tuner.current == 2
    assert used[100:].count(1) * (0.151 - 0.097) < 0.05 * machine.now, "probing stays within its time budget"


def test_noise_below_the_margin_does_not_switch_and_probes_back_off() -> None:
    machine = FakeMachine({1: 0.100, 2: 0.097})
    tuner = machine.tuner()
    machine.run(tuner, 3000)
    assert tuner.current == 2
    machine.cost = {1: 0.097, 2: 0.100}
    machine.run(tuner, 3000)
    assert tuner.current == 2, "3% is within the noise margin"
    assert tuner.interval == tuner.max_interval


def test_a_batch_change_abandons_the_probe() -> None:
    machine = FakeMachine({1: 0.06, 2: 0.7})
    tuner = machine.tuner()
    tuner.begin(("decode", 4))
    tuner.end(("decode", 4), 0.7)
    tuner.begin(("decode", 5))  # a request joined: step times are no longer comparable
    tuner.end(("decode", 5), 0.05)
    assert tuner.plan == [] and tuner.current == 2
    machine.run(tuner, 50, key=("decode", 5))
    assert tuner.current == 1


def test_prefills_are_compared_per_token_and_other_kinds_run_at_the_current_count() -> None:
    machine = FakeMachine({1: 0.002, 2: 0.004})
    tuner = machine.tuner()
    tuner.begin(("prefill",))  # the probe starts on a prefill, at the current count first
    assert machine.threads == 2
    tuner.end(("prefill",), 0.004 * 100, units=100)
    tuner.begin(("decode", 1))  # a decode step in between is not part of the prefill probe
    assert machine.threads == 2
    tuner.end(("decode", 1), 0.5)
    tuner.begin(("prefill",))
    assert machine.threads == 1
    tuner.end(("prefill",), 0.002 * 80, units=80)  # shorter prompt, faster per token
    machine.run(tuner, 2, key=("prefill",), units=120)  # the second round confirms it
    assert tuner.current == 1


def test_a_probe_of_a_kind_that_stops_coming_is_dropped() -> None:
    machine = FakeMachine({1: 0.06, 2: 0.7})
    tuner = machine.tuner()
    tuner.begin(("prefill",))
    tuner.end(("prefill",), 0.01)  # one request: no second prefill to compare with
    machine.run(tuner, 40, key=("decode", 1))
    assert tuner.current == 1


def test_a_cut_short_probe_still_decides_from_what_it_timed() -> None:
    machine = FakeMachine({1: 0.002, 2: 0.004})
    tuner = machine.tuner()
    machine.run(tuner, 2, key=("prefill",), units=100)  # two requests: one prefill at each count
    machine.run(tuner, 8, key=("decode", 2))  # then only decode steps: the prefill probe is dropped
    assert tuner.current == 1


def test_operations_marked_not_to_probe_never_start_a_probe() -> None:
    machine = FakeMachine({1: 0.004, 2: 0.040})
    tuner = machine.tuner()
    for _ in range(20):
        tuner.begin(("prefill",), probe=False)
        assert machine.threads == 2
        tuner.end(("prefill",), 0.4, units=100)
    assert tuner.plan == []
    tuner.begin(("decode", 1))
    assert tuner.plan, "a decode step starts the probe that was due"


def test_run_in_fresh_thread_runs_elsewhere_returns_and_raises() -> None:
    import threading

    import pytest

    from llava_serve.engine.threads import run_in_fresh_thread

    ran_in: list[threading.Thread] = []

    def work() -> int:
        ran_in.append(threading.current_thread())
        return 42

    assert run_in_fresh_thread(work, name="probe") == 42
    assert ran_in[0] is not threading.current_thread() and ran_in[0].name == "probe"
    assert not ran_in[0].is_alive(), "the thread has exited (its OpenMP pool with it)"
    assert ran_in[0].daemon, "an interrupted caller does not wait for it at exit"

    def broken() -> int:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        run_in_fresh_thread(broken)
