"""Registry: heartbeats, expiry (fake clock), health marking, model listing, aggregate status."""

from __future__ import annotations

from llava_serve.controller.registry import Registry
from llava_serve.protocol.worker import WorkerStatus


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _status(*models: str, speed: float = 1.0, queue: int = 0) -> WorkerStatus:
    return WorkerStatus(model_names=list(models), speed=speed, queue_length=queue)


def test_expiry_follows_heartbeats() -> None:
    clock = FakeClock()
    reg = Registry(expiration=30, clock=clock)
    reg.register("http://a", _status("m"))
    reg.register("http://b", _status("m"))
    reg.register("http://pinned", _status("m"), check_heart_beat=False)
    clock.now += 20
    assert reg.heart_beat("http://a", queue_length=3)
    clock.now += 15  # b silent for 35 s, a for 15 s
    assert reg.expire() == ["http://b"]
    assert "http://a" in reg and "http://b" not in reg
    clock.now += 1000
    assert reg.expire() == ["http://a"]
    assert "http://pinned" in reg  # registered without heartbeat checks: never expires
    assert reg.get("http://a") is None


def test_unknown_heartbeat_asks_to_register() -> None:
    reg = Registry(expiration=30, clock=FakeClock())
    assert reg.heart_beat("http://nobody", 0) is False
    reg.register("http://a", _status("m"))
    assert reg.unregister("http://a") is True
    assert reg.unregister("http://a") is False
    assert reg.heart_beat("http://a", 0) is False


def test_unhealthy_out_of_rotation_until_heartbeat() -> None:
    reg = Registry(expiration=30, clock=FakeClock())
    reg.register("http://a", _status("m"))
    reg.register("http://b", _status("m", "n"))
    reg.mark_unhealthy("http://b")
    assert [w.name for w in reg.candidates("m")] == ["http://a"]
    assert reg.candidates("n") == []
    assert reg.model_names() == ["m", "n"]  # still registered: "no worker now", not "no such model"
    assert reg.aggregate_status().model_names == ["m"]
    assert reg.heart_beat("http://b", 0)
    assert [w.name for w in reg.candidates("m")] == ["http://a", "http://b"]
    assert reg.aggregate_status().model_names == ["m", "n"]
    assert [w.name for w in reg.candidates("m", exclude=["http://a"])] == ["http://b"]
    reg.mark_unhealthy("http://b")
    reg.register("http://b", _status("m"))  # re-registration also restores it
    assert len(reg.candidates("m")) == 2


def test_aggregate_status_and_dispatch_counting() -> None:
    reg = Registry(expiration=30, clock=FakeClock())
    reg.register("http://a", _status("m", speed=2, queue=1))
    reg.register("http://b", _status("n", speed=3, queue=4))
    reg.register("http://c", _status("n", speed=5, queue=9))
    reg.mark_unhealthy("http://c")
    reg.note_dispatch("http://a")
    assert reg.aggregate_status() == _status("m", "n", speed=5, queue=6)
    reg.heart_beat("http://a", 0)  # the heartbeat's count replaces the estimate
    assert reg.get("http://a").queue_length == 0  # type: ignore[union-attr]


def test_non_positive_speed_treated_as_one() -> None:
    reg = Registry(expiration=30, clock=FakeClock())
    reg.register("http://a", _status("m", speed=0, queue=2))
    assert reg.get("http://a").load == 2  # type: ignore[union-attr]
