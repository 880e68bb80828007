"""`llava-serve soak`: the whole stack under steady mixed load for N minutes; does anything grow?

    python -m llava_serve.tools.soak --minutes 10 [--model-path P] [--out soak-out] [--plot docs/images/soak.png]

Starts a controller, workers and the OpenAI API as processes on free ports (a tiny random LLaVA built
offline unless --model-path names a checkpoint: what is measured is the serving stack, not the
model), then keeps --concurrency clients busy with a mix of requests, each with its own image:
OpenAI chat through the API (openai client, streaming and not), worker-protocol streams through
the controller, and streaming and non-streaming requests straight to a worker. RSS, open file
descriptors and threads of every service are sampled (--sample-every; each minute by default, every
5 s for runs under 5 minutes). After the warm-up (the first fifth of the run), each must grow by
less than --max-growth (5%; fds and threads, sampled under load, may also differ by those of the
requests in flight: 3 per client), and every request must succeed. Writes summary.json and
soak.png to --out; the exit status is 0 when it passes.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from llava_serve.protocol.frames import FinishReason, Frame, iter_frames_sync

MODEL = "soak-llava"
METRICS = ("rss_mib", "fds", "threads")
# fds and threads sampled under load count those of the requests in flight (a client connection, an
# upstream one, a pool thread): up to about 3 per client at any instant, on top of the max growth.
IN_FLIGHT_PER_CLIENT = 3
# RSS may also step once by this much (an allocator arena, a cache doubling its columns: a CI run saw
# one +32 MiB step on a 559 MiB worker, flat before and after); a leak keeps growing past it
RSS_STEP_MIB = 48


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 10.0
    model_path: str | None = None
    workers: int = 2
    concurrency: int = 4
    sample_every: float | None = None  # None: 60 s, or 5 s for runs under 5 minutes
    max_growth: float = 0.05
    out: str = "soak-out"
    plot: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.workers < 1 or self.concurrency < 1 or not 0 < self.max_growth < 1:
            raise ValueError("--minutes > 0, --workers >= 1, --concurrency >= 1, 0 < --max-growth < 1")

    @property
    def interval(self) -> float:
        return self.sample_every or (60.0 if self.minutes >= 5 else 5.0)

    @property
    def warmup(self) -> float:
        return self.minutes * 60 / 5


def parser() -> argparse.ArgumentParser:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="llava-serve soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--model-path", default=None, help="checkpoint (default: a tiny random LLaVA built offline)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="clients sending requests")
    p.add_argument("--sample-every", type=float, default=None, help="seconds between samples")
    p.add_argument("--max-growth", type=float, default=d.max_growth)
    p.add_argument("--out", default=d.out, help="folder for summary.json, soak.png and the service logs")
    p.add_argument("--plot", default=None, help="also write the plot here (e.g. docs/images/soak.png)")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


# -- the cluster ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """Controller, workers and API as processes; stopped (SIGTERM, then SIGKILL) by their own pids."""

    def __init__(self, model_path: str, workers: int, logs: Path) -> None:
        self.logs = logs
        self.ports = {"controller": free_port(), "api": free_port()}
        self.ports.update({f"worker{i}": free_port() for i in range(workers)})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.model_path = model_path

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def workers(self) -> list[str]:
        return [n for n in self.ports if n.startswith("worker")]

    def argv(self, name: str) -> list[str]:
        port, ctrl = str(self.ports[name]), self.url("controller")
        if name == "controller":
            return ["llava_serve.controller", "--port", port, "--log-level", "warning"]
        if name == "api":
            return ["llava_serve.openai_api", "--port", port, "--controller-address", ctrl, "--log-level", "warning"]
        return ["llava_serve.model_worker", "--model-path", self.model_path, "--model-name", MODEL, "--port", port,
                "--worker-address", self.url(name), "--controller-address", ctrl, "--limit-model-concurrency", "8",
                "--log-level", "warning"]  # fmt: skip

    def start(self, timeout: float = 600) -> None:
        for name in self.ports:
            log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (owned by the process)
            cmd = [sys.executable, "-m", *self.argv(name)]
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._models_listed():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs.values()):
                raise RuntimeError(f"the cluster did not come up; see the logs in {self.logs}")
            time.sleep(0.5)

    def _models_listed(self) -> bool:
        try:
            status = httpx.post(self.url("controller") + "/worker_get_status", timeout=2).json()
            return bool(status["speed"] == len(self.workers) and httpx.get(self.url("api") + "/health").is_success)
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def build_tiny(folder: Path) -> str:
    from llava_serve.tools.checkpoints.build import build

    return str(build("llava", "tiny", folder / "tiny-llava"))


# -- sampling -------------------------------------------------------------------------------------
def sample(pid: int) -> dict[str, float]:
    import psutil

    proc = psutil.Process(pid)
    return {"rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds(), "threads": proc.num_threads()}


class Sampler(threading.Thread):
    def __init__(self, cluster: Cluster, interval: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.cluster, self.interval = cluster, interval
        self.rows: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while True:
            t = time.monotonic() - self.t0
            for name, proc in self.cluster.procs.items():
                if proc.poll() is None:  # a dead service shows as a gap (and failed requests)
                    self.rows.append({"t": round(t, 1), "service": name, **sample(proc.pid)})
            if self.stopped.wait(self.interval):
                return


# -- load -----------------------------------------------------------------------------------------
def image_data(rng: random.Random) -> tuple[str, str]:
    """A small picture of a random colour and size, as base64, and its format."""
    from PIL import Image

    fmt = rng.choice(["PNG", "JPEG"])
    img = Image.new("RGB", (rng.randint(16, 96), rng.randint(16, 96)), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode(), fmt.lower()


class Load:
    """Client threads sending a mix of requests until the deadline; every outcome is counted."""

    KINDS = ("api_stream", "api", "controller_stream", "worker_stream", "worker")

    def __init__(self, cluster: Cluster, config: SoakConfig) -> None:
        from openai import OpenAI

        self.cluster, self.config = cluster, config
        self.openai = OpenAI(base_url=cluster.url("api") + "/v1", api_key="none", max_retries=0, timeout=120)
        self.http = httpx.Client(timeout=120)
        self.outcomes: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(i, deadline)) for i in range(self.config.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.http.close()

    def _client(self, i: int, deadline: float) -> None:
        rng = random.Random(self.config.seed * 1000 + i)
        while time.monotonic() < deadline:
            kind = rng.choice(self.KINDS)
            t0 = time.monotonic()
            try:
                getattr(self, kind)(rng)
                outcome = kind
            except Exception as exc:  # every failure is a finding: counted and kept
                outcome = f"{kind}:error"
                with self.lock:
                    self.errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:300]}")
            with self.lock:
                self.outcomes[outcome] += 1
                self.latency[kind].append(time.monotonic() - t0)

    def _messages(self, rng: random.Random) -> list[dict[str, Any]]:
        data, fmt = image_data(rng)
        url = f"data:image/{fmt};base64,{data}"
        question = rng.choice(["What is in this picture?", "What colour is it?", "Describe the image."])
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]  # fmt: skip

    def api(self, rng: random.Random) -> None:
        reply = self.openai.chat.completions.create(model=MODEL, messages=self._messages(rng),  # type: ignore[arg-type]
                                                    max_tokens=rng.randint(8, 48), temperature=0.7)  # fmt: skip
        assert reply.choices[0].finish_reason in ("stop", "length"), reply

    def api_stream(self, rng: random.Random) -> None:
        stream = self.openai.chat.completions.create(model=MODEL, messages=self._messages(rng), stream=True,  # type: ignore[arg-type]
                                                     max_tokens=rng.randint(8, 48))  # fmt: skip
        finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        assert finish and finish[-1] in ("stop", "length"), finish

    def _worker_body(self, rng: random.Random, worker: str) -> dict[str, Any]:
        """A worker-protocol request, its prompt built by the worker's own template."""
        content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
        built = self.http.post(
            worker + "/worker_build_prompt", json={"messages": [{"role": "user", "content": content}]}
        )
        built.raise_for_status()
        data, _ = image_data(rng)
        return {"model": MODEL, "prompt": built.json()["prompt"], "images": [data], "echo": False,
                "max_new_tokens": rng.randint(8, 48), "temperature": rng.choice([0, 0.8])}  # fmt: skip

    def _stream(self, url: str, body: dict[str, Any]) -> None:
        last = Frame()
        with self.http.stream("POST", url, json=body) as resp:
            assert resp.status_code == 200, resp.read()[:300]
            for last in iter_frames_sync(resp.iter_bytes()):  # noqa: B007 - the last one is checked
                pass
        assert last.error_code == 0 and last.finish_reason in FINISHED, last

    def controller_stream(self, rng: random.Random) -> None:
        worker = self.cluster.url(rng.choice(self.cluster.workers))
        self._stream(self.cluster.url("controller") + "/worker_generate_stream", self._worker_body(rng, worker))

    def worker_stream(self, rng: random.Random) -> None:
        worker = self.cluster.url(rng.choice(self.cluster.workers))
        self._stream(worker + "/worker_generate_stream", self._worker_body(rng, worker))

    def worker(self, rng: random.Random) -> None:
        worker = self.cluster.url(rng.choice(self.cluster.workers))
        response = self.http.post(worker + "/worker_generate", json=self._worker_body(rng, worker))
        answer = Frame.model_validate(response.json())
        assert answer.error_code == 0 and answer.finish_reason in FINISHED, answer


FINISHED = (FinishReason.STOP, FinishReason.LENGTH)


# -- verdict --------------------------------------------------------------------------------------
def growth(
    rows: list[dict[str, Any]], warmup: float, limit: float, clients: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per service and metric: median of the first 3 samples after the warm-up vs the last 3."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for service in sorted({r["service"] for r in rows}):
        after = [r for r in rows if r["service"] == service and r["t"] >= warmup]
        out[service] = {}
        for metric in METRICS:
            start = statistics.median(r[metric] for r in after[:3])
            end = statistics.median(r[metric] for r in after[-3:])
            if metric == "rss_mib":
                allowed = max(start * limit, RSS_STEP_MIB)
            else:
                allowed = start * limit + IN_FLIGHT_PER_CLIENT * clients
            rel = round((end - start) / start, 4)
            out[service][metric] = {"start": round(start, 1), "end": round(end, 1), "growth": rel,
                                    "ok": end - start <= allowed}  # fmt: skip
    return out


def latency(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"n": len(ordered), "p50_s": round(statistics.median(ordered), 3),
            "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3)}  # fmt: skip


def plot(rows: list[dict[str, Any]], warmup: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    labels = {"rss_mib": "RSS (MiB)", "fds": "open file descriptors", "threads": "threads"}
    for ax, metric in zip(axes, METRICS):
        for service in sorted({r["service"] for r in rows}):
            pts = [(r["t"] / 60, r[metric]) for r in rows if r["service"] == service]
            ax.plot(*zip(*pts), marker=".", label=service)
        ax.axvspan(0, warmup / 60, color="grey", alpha=0.15, label="warm-up")
        ax.set_ylabel(labels[metric])
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8, ncol=3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: SoakConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = config.model_path or build_tiny(Path(tmp))
        cluster = Cluster(model, config.workers, out)
        try:
            print(f"soak: starting {len(cluster.ports)} services (logs in {out})", flush=True)
            cluster.start()
            sampler = Sampler(cluster, config.interval)
            load = Load(cluster, config)
            sampler.start()
            print(f"soak: {config.minutes:g} min of load from {config.concurrency} clients", flush=True)
            load.run(config.minutes * 60)
            sampler.stopped.set()
            sampler.join()
        finally:
            cluster.stop()
    verdict = growth(sampler.rows, config.warmup, config.max_growth, config.concurrency)
    failed = sum(n for k, n in load.outcomes.items() if k.endswith(":error"))
    passed = failed == 0 and all(m["ok"] for s in verdict.values() for m in s.values())
    lat = {k: latency(v) for k, v in sorted(load.latency.items())}
    summary = {"passed": passed, "config": asdict(config), "requests": sum(load.outcomes.values()),
               "failed": failed, "outcomes": dict(load.outcomes), "errors": load.errors[:20], "latency": lat,
               "growth_after_warmup": verdict, "samples": sampler.rows}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    title = (f"llava-serve soak: {config.minutes:g} min, {summary['requests']} requests, {failed} failed, "
             f"{'PASS' if passed else 'FAIL'} (growth after warm-up < {config.max_growth:.0%})")  # fmt: skip
    for path in [out / "soak.png"] + ([Path(config.plot)] if config.plot else []):
        plot(sampler.rows, config.warmup, title, path)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = SoakConfig(**vars(args))
    summary = run(config)
    for service, metrics in summary["growth_after_warmup"].items():
        cells = ", ".join(f"{m} {v['start']:g}->{v['end']:g} ({v['growth']:+.1%}){'' if v['ok'] else ' TOO MUCH'}"
                          for m, v in metrics.items())  # fmt: skip
        print(f"soak: {service}: {cells}")
    print(f"soak: {summary['requests']} requests, {summary['failed']} failed; "
          f"{'PASS' if summary['passed'] else 'FAIL'}; {config.out}/summary.json, {config.out}/soak.png")  # fmt: skip
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
