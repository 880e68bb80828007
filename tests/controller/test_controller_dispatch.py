"""Dispatch methods: shortest_queue, lottery (weighted by speed), power_of_two; exclusion."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from llava_serve.controller.dispatch import Dispatcher, lottery, power_of_two, shortest_queue
from llava_serve.controller.registry import Registry, WorkerInfo
from llava_serve.protocol.worker import WorkerStatus


def _w(name: str, queue: int, speed: float = 1.0) -> WorkerInfo:
    return WorkerInfo(name, ["m"], speed, queue, True, 0.0)


def test_shortest_queue_uses_queue_over_speed() -> None:
    rng = random.Random(0)
    workers = [_w("a", 4, speed=1), _w("b", 6, speed=3), _w("c", 3, speed=1)]
    assert {shortest_queue(workers, rng).name for _ in range(20)} == {"b"}  # 2.0 < 3.0 < 4.0


def test_shortest_queue_breaks_ties_randomly() -> None:
    rng = random.Random(0)
    picks = Counter(shortest_queue([_w("a", 1), _w("b", 1), _w("c", 5)], rng).name for _ in range(200))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 60


def test_lottery_weighted_by_speed() -> None:
    rng = random.Random(1)
    picks = Counter(lottery([_w("slow", 0, 1), _w("fast", 0, 9)], rng).name for _ in range(2000))
    assert 0.85 < picks["fast"] / 2000 < 0.95


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    rng = random.Random(2)
    workers = [_w("a", 0), _w("b", 5), _w("c", 100)]
    picks = Counter(power_of_two(workers, rng).name for _ in range(300))
    assert picks["c"] == 0 and picks["a"] > picks["b"] > 0
    assert power_of_two([_w("only", 7)], rng).name == "only"


@pytest.mark.parametrize("method", ["shortest_queue", "lottery", "power_of_two"])
def test_dispatcher_counts_and_excludes(method: str) -> None:
    reg = Registry(expiration=30)
    for name in ("http://a", "http://b"):
        reg.register(name, WorkerStatus(model_names=["m"]))
    d = Dispatcher(reg, method, random.Random(3))
    first = d.choose("m")
    assert first is not None and first.queue_length == 1
    other = d.choose("m", exclude=[first.name])
    assert other is not None and other.name != first.name
    assert d.choose("m", exclude=["http://a", "http://b"]) is None
    assert d.choose("unknown") is None


def test_shortest_queue_spreads_between_heartbeats() -> None:
    reg = Registry(expiration=30)
    for name in ("http://a", "http://b"):
        reg.register(name, WorkerStatus(model_names=["m"]))
    d = Dispatcher(reg, "shortest_queue", random.Random(4))
    picks = Counter(d.choose("m").name for _ in range(10))  # type: ignore[union-attr]
    assert picks == {"http://a": 5, "http://b": 5}


def test_unknown_method_refused() -> None:
    with pytest.raises(ValueError, match="unknown dispatch method"):
        Dispatcher(Registry(expiration=30), "round_robin")
