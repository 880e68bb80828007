"""The soak's growth verdict on made-up samples: a one-time RSS step passes, steady growth fails."""

from __future__ import annotations

from llava_serve.tools.soak import growth


def samples(rss: list[float], fds: int = 40, threads: int = 20) -> list[dict]:
    return [
        {"service": "worker1", "t": 10.0 * i, "rss_mib": r, "fds": fds, "threads": threads} for i, r in enumerate(rss)
    ]


def test_a_one_time_rss_step_is_not_a_leak() -> None:
    rss = [559.0] * 8 + [591.0] * 8  # the +32 MiB step a CI run saw, flat before and after
    verdict = growth(samples(rss), warmup=0, limit=0.05, clients=4)["worker1"]["rss_mib"]
    assert verdict["ok"] and verdict["growth"] > 0.05


def test_steady_rss_growth_is_a_leak() -> None:
    rss = [559.0 + 6 * i for i in range(16)]  # +90 MiB over the run
    verdict = growth(samples(rss), warmup=0, limit=0.05, clients=4)["worker1"]["rss_mib"]
    assert not verdict["ok"]
    big = [2000.0 + 8 * i for i in range(16)]  # over 5% of a large process, past the step allowance too
    assert not growth(samples(big), warmup=0, limit=0.05, clients=4)["worker1"]["rss_mib"]["ok"]


def test_fds_growth_beyond_the_in_flight_allowance_fails() -> None:
    rows = samples([500.0] * 16)
    for i, row in enumerate(rows):
        row["fds"] = 40 + 3 * i
    assert not growth(rows, warmup=0, limit=0.05, clients=4)["worker1"]["fds"]["ok"]
