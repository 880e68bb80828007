"""ITL of running streams while image requests keep arriving: what chunked prefill is for.

    python benchmarks/arrivals_itl.py --model-path M --step-tokens 0,32,64 --seconds 12 \
        [--quantization int8|int4] [--rounds 3]

For each setting of the engine's `step_tokens` (0 = never chunk: a newcomer's whole prompt in one
step, what the engine did before), in-process: 8 streams decode alone for `--idle-seconds` once
all their prompts are read (idle ITL), then
a new request with a fresh image arrives every second for `--seconds` (it generates 16 tokens
and leaves) while the 8 keep decoding. Prints the 8 streams' ITL p50/p95 in both phases and the
ratio p95(arrivals) / p95(idle); issue 12 asks for <= 2.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.profile_engine import engine_requests
from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.request import Request, RequestOutput
from llava_serve.models.loader import LoadOptions, load_model


class Stream:
    """Per-token gaps of one request, from the outputs the engine sends."""

    def __init__(self) -> None:
        self.gaps: list[tuple[float, float]] = []  # (when, seconds per token)
        self.last: tuple[float, int] | None = None

    def sink(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if self.last is not None and out.completion_tokens > self.last[1]:
            per_token = (now - self.last[0]) / (out.completion_tokens - self.last[1])
            self.gaps.extend([(now, per_token)] * (out.completion_tokens - self.last[1]))
        self.last = (now, out.completion_tokens)


def with_sink(req: Request, sink) -> Request:
    req.sink = sink
    return req


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_setting(
    lm, step_tokens: int, seconds: float, idle_seconds: float, round_id: int, quantization: str | None = None
) -> dict[str, float]:
    eng = BatchEngine(
        lm,
        max_running=16,
        max_waiting=64,
        step_tokens=step_tokens or 10**9,
        prefix_cache_bytes=0,
        quantization=quantization,
    ).start()
    streams = [Stream() for _ in range(8)]
    for stream, req in zip(streams, engine_requests(lm, 8, 100_000, round_id)):
        eng.submit(with_sink(req, stream.sink))
    while not all(s.last is not None and s.last[1] >= 2 for s in streams):  # all 8 prompts read
        time.sleep(0.05)
    idle_start = time.perf_counter()
    time.sleep(idle_seconds)
    phase = time.perf_counter()
    arrivals = engine_requests(lm, int(seconds), 16, round_id + 1000)
    for req in arrivals:
        eng.submit(req)
        time.sleep(1.0)
    end = time.perf_counter()
    eng.abort_all()
    eng.shutdown()
    idle = [g for s in streams for t, g in s.gaps if idle_start <= t < phase]
    busy = [g for s in streams for t, g in s.gaps if phase <= t < end]
    return {
        "idle_p50": statistics.median(idle) * 1000,
        "idle_p95": percentile(idle, 0.95) * 1000,
        "busy_p50": statistics.median(busy) * 1000,
        "busy_p95": percentile(busy, 0.95) * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-path", required=True)
    p.add_argument("--step-tokens", default="0,32,64")
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--idle-seconds", type=float, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quantization", default=None, choices=["int8", "int4"], help="the engine's integer weights")
    p.add_argument(
        "--rounds", type=int, default=1, help="rounds per setting (the machine is noisy): each, and the median ratio"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for i, budget in enumerate(int(x) for x in args.step_tokens.split(",")):
        ratios = []
        for k in range(args.rounds):
            lm = load_model(LoadOptions(model_path=args.model_path, device="cpu"))  # int8 takes its float weights
            r = one_setting(lm, budget, args.seconds, args.idle_seconds, 50 + 10 * i + 100 * k, args.quantization)
            ratios.append(r["busy_p95"] / r["idle_p95"])
            print(
                f"step_tokens {budget or 'off':>4}: ITL idle p50/p95 {r['idle_p50']:.0f}/{r['idle_p95']:.0f} ms, "
                f"with arrivals {r['busy_p50']:.0f}/{r['busy_p95']:.0f} ms, p95 ratio {ratios[-1]:.2f}",
                flush=True,
            )
        if args.rounds > 1:
            median = statistics.median(ratios)
            print(f"step_tokens {budget or 'off':>4}: median p95 ratio of {args.rounds} rounds {median:.2f}")


if __name__ == "__main__":
    main()
