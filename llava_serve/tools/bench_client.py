"""The benchmark's clients: N concurrent streaming requests to one worker, and what they measured.

A client reads the worker's `\\0`-delimited JSON frames as a LLaVA client does and stamps each
frame's arrival. TTFT is the first frame (the worker always sends the first token's frame);
inter-token latency is the gap between successive frames (a frame can carry more than one token
when a token ends in half a character, so `frames_per_token` is reported beside it); TPOT is a
request's (last frame - first frame) / (tokens - 1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
import psutil

from llava_serve.protocol.frames import Frame, FrameSplitter, decode_frame
from llava_serve.tools.bench_workload import BenchRequest


@dataclass
class StreamResult:
    start: float
    end: float = 0.0
    frame_times: list[float] = field(default_factory=list)
    frame_tokens: list[int] = field(default_factory=list)  # completion tokens so far, at each frame
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class LevelSummary:
    engine: str
    concurrency: int
    max_new_tokens: int
    requests: int
    errors: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_ms: float
    itl_p95_ms: float
    tpot_mean_ms: float
    frames_per_token: float
    peak_rss_mib: float
    other_load_cores: float  # CPU used by everything else on the machine meanwhile
    repeat: int = 0
    first_error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[int], None]
BodyOf = Callable[[BenchRequest, int], dict]
StreamOne = Callable[[httpx.AsyncClient, str, dict, Progress], Awaitable["StreamResult"]]


def _no_progress(tokens: int) -> None:
    pass


async def stream_one(
    client: httpx.AsyncClient, url: str, body: dict, progress: Progress = _no_progress
) -> StreamResult:
    result = StreamResult(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            splitter = FrameSplitter()
            async for chunk in resp.aiter_bytes():
                now = time.perf_counter()
                for raw in splitter.feed(chunk):
                    seen = len(result.frame_times)
                    _read_frame(result, decode_frame(raw), now)
                    progress(max(result.completion_tokens, len(result.frame_times)) - seen)
            if resp.status_code != 200 and result.error is None:
                result.error = f"HTTP {resp.status_code}"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    if result.error is None and result.finish_reason is None:
        result.error = "the stream ended without a final frame"
    return result


def _read_frame(result: StreamResult, frame: Frame, now: float) -> None:
    if frame.error_code:
        result.error = frame.error_message[:300]
        return
    tokens = frame.usage.completion_tokens if frame.usage is not None else None
    if frame.finish_reason is not None:
        result.finish_reason = frame.finish_reason.value
        result.completion_tokens = int(tokens or 0)
        if frame.text and not result.frame_times:
            result.frame_times.append(now)  # a one-token answer: its only frame is the last
            result.frame_tokens.append(int(tokens or 1))
        return
    result.frame_times.append(now)
    # a worker that sends no usage before the end: count one token per frame
    result.frame_tokens.append(int(tokens) if tokens is not None else len(result.frame_times))


class Sampler:
    """While a round runs: peak resident memory of the measured process (and its children), and
    the CPU the rest of the machine used (cores), so a reader can tell a quiet run from a busy one."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._task: asyncio.Task[None] | None = None
        self._start = (0.0, 0.0, 0.0)
        self.other_load = float("nan")

    def sample(self) -> None:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
            self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass

    @staticmethod
    def _cpu() -> tuple[float, float, float]:
        """(wall, busy CPU seconds of the machine, CPU seconds of this benchmark's processes)."""
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        me = psutil.Process()
        ours = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                ours += t.user + t.system
            except psutil.Error:
                pass
        return time.perf_counter(), busy, ours

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    def __enter__(self) -> Sampler:
        self._start = self._cpu()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        if self._task is not None:
            self._task.cancel()
        wall, busy, ours = (b - a for a, b in zip(self._start, self._cpu(), strict=True))
        self.other_load = max(0.0, (busy - ours) / wall) if wall > 0 else float("nan")


async def drive(
    url: str,
    requests: Sequence[BenchRequest],
    max_new_tokens: int,
    pid: int,
    timeout: float,
    progress: Progress = _no_progress,
    body: BodyOf = BenchRequest.body,
    stream: StreamOne | None = None,
) -> tuple[list[StreamResult], float, Sampler]:
    """All requests at once; returns the results, the wall time and what the sampler saw. `body` and
    `stream` say how to ask and read one request: the worker's protocol unless a peer passes its own."""
    read = stream or stream_one
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        bodies = [body(r, max_new_tokens) for r in requests]
        with Sampler(pid) as sampler:
            start = time.perf_counter()
            results = await asyncio.gather(*(read(client, url, b, progress) for b in bodies))
            wall = time.perf_counter() - start
    return list(results), wall, sampler


def summarize(
    engine: str,
    concurrency: int,
    max_new_tokens: int,
    results: Sequence[StreamResult],
    wall: float,
    sampler: Sampler,
    repeat: int = 0,
) -> LevelSummary:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.frame_times[0] - r.start for r in ok if r.frame_times]
    gaps = [gap for r in ok for gap in token_gaps(r)]
    tpot = [
        (r.frame_times[-1] - r.frame_times[0]) / (r.completion_tokens - 1)
        for r in ok
        if r.completion_tokens > 1 and len(r.frame_times) > 1
    ]
    frames = sum(len(r.frame_times) for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return LevelSummary(
        engine=engine,
        concurrency=concurrency,
        max_new_tokens=max_new_tokens,
        requests=len(results),
        errors=len(errors),
        wall_s=wall,
        tokens=tokens,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        ttft_p50_s=_pct(ttft, 50),
        ttft_p95_s=_pct(ttft, 95),
        itl_p50_ms=1000 * _pct(gaps, 50),
        itl_p95_ms=1000 * _pct(gaps, 95),
        tpot_mean_ms=1000 * float(np.mean(tpot)) if tpot else float("nan"),
        frames_per_token=frames / tokens if tokens else float("nan"),
        peak_rss_mib=sampler.peak_mib,
        other_load_cores=sampler.other_load,
        repeat=repeat,
        first_error=errors[0] if errors else None,
    )


def token_gaps(result: StreamResult) -> list[float]:
    """Inter-token latencies of one stream: each gap between frames, split evenly over the tokens
    the later frame adds (a frame can carry several: text held back mid-character)."""
    gaps: list[float] = []
    marks = list(zip(result.frame_times, result.frame_tokens, strict=True))
    for (t0, n0), (t1, n1) in zip(marks, marks[1:], strict=False):
        added = max(1, n1 - n0)
        gaps += [(t1 - t0) / added] * added
    return gaps


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
