"""ThreadTuner: keeps the thread count whose operations are fastest, probing cheaply."""

from __future__ import annotations

from collections.abc import Hashable

from llava_serve.engine.threads import ThreadTuner

DECODE: Hashable = ("decode", 4)


class FakeMachine:
    """Time per operation for each thread count; records every set_num_threads call."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost = cost
        self.threads = max(cost)  # torch starts at its default
        self.calls: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.calls.append(n)


def run(tuner: ThreadTuner, machine: FakeMachine, steps: int, key: Hashable = DECODE) -> list[int]:
    used = []
    for _ in range(steps):
        tuner.begin(key)
        used.append(machine.threads)
        tuner.end(key, machine.cost[machine.threads])
    return used


def test_single_thread_machine_is_left_alone() -> None:
    machine = FakeMachine({1: 1.0})
    tuner = ThreadTuner(1, set_threads=machine.set_threads)
    run(tuner, machine, 50)
    assert not tuner.enabled and machine.calls == []


def test_moves_to_one_thread_under_contention_and_back_when_quiet() -> None:
    machine = FakeMachine({1: 0.06, 2: 0.7})  # a busy neighbour: two threads stall
    tuner = ThreadTuner(2, set_threads=machine.set_threads)
    used = run(tuner, machine, 200)
    assert tuner.current == 1
    assert used[-100:].count(2) <= 3, "a clearly slower count is tried for one step at a time"
    machine.cost = {1: 0.15, 2: 0.097}  # the neighbour left
    run(tuner, machine, 100)
    assert tuner.current == 2


def test_noise_below_the_margin_does_not_switch() -> None:
    machine = FakeMachine({1: 0.100, 2: 0.097})
    tuner = ThreadTuner(2, set_threads=machine.set_threads)
    run(tuner, machine, 300)
    assert tuner.current == 2
    assert tuner.period == tuner.max_period  # backed off while the choice held


def test_a_batch_change_abandons_the_probe() -> None:
    machine = FakeMachine({1: 0.06, 2: 0.7})
    tuner = ThreadTuner(2, set_threads=machine.set_threads)
    tuner.begin(("decode", 4))
    tuner.end(("decode", 4), 0.7)
    tuner.begin(("decode", 5))  # a request joined: step times are no longer comparable
    tuner.end(("decode", 5), 0.9)
    assert tuner.plan == [] and tuner.current == 2
    run(tuner, machine, 20, key=("decode", 5))
    assert tuner.current == 1


def test_prefills_are_probed_per_token_and_other_kinds_run_at_the_current_count() -> None:
    machine = FakeMachine({1: 0.002, 2: 0.02})
    tuner = ThreadTuner(2, set_threads=machine.set_threads)
    tuner.begin(("prefill",))  # the probe starts on a prefill: it runs at the current count (2)
    assert machine.threads == 2
    tuner.end(("prefill",), 0.02)
    tuner.begin(("decode", 1))  # a decode step in between is not part of the prefill probe
    assert machine.threads == 2
    tuner.end(("decode", 1), 0.5)
    tuner.begin(("prefill",))
    assert machine.threads == 1
    tuner.end(("prefill",), 0.002)
    assert tuner.current == 1 or tuner.plan  # decided, or still confirming


def test_a_probe_of_a_kind_that_stops_coming_is_dropped() -> None:
    machine = FakeMachine({1: 0.06, 2: 0.7})
    tuner = ThreadTuner(2, set_threads=machine.set_threads)
    tuner.begin(("prefill",))
    tuner.end(("prefill",), 0.01)  # one request: no second prefill to compare with
    run(tuner, machine, 40, key=("decode", 1))
    assert tuner.current == 1


def test_idle_spell_triggers_a_probe() -> None:
    machine = FakeMachine({1: 0.100, 2: 0.097})
    tuner = ThreadTuner(2, set_threads=machine.set_threads)
    run(tuner, machine, 40)
    tuner.idle()
    tuner.begin(DECODE)
    assert tuner.plan, "the first operation after idling starts a probe"
