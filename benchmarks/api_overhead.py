"""Time to first token through the OpenAI API vs calling the worker directly, one client, default model.

    python benchmarks/api_overhead.py [--rounds 40] [--model-path P]

Starts a controller, one worker and the API (real processes on free ports), then alternates the same
chat request (one picture, greedy, 8 tokens) between three paths: the worker's /worker_chat_stream,
the controller's (controller -> worker) and the API's streaming /v1/chat/completions
(API -> controller -> worker). TTFT is the time to the first frame/chunk that carries answer text.
Prints the medians and their ratios; the paths alternate so machine noise hits them alike. Then,
on Linux, each process's CPU time per request on each path (`--cpu-requests` more requests a path,
read from /proc/PID/task/*/schedstat): steadier than the latencies on a shared machine.
"""

from __future__ import annotations

import argparse
import base64
import glob
import io
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from tqdm import tqdm

from llava_serve.protocol.frames import FrameSplitter, decode_frame
from llava_serve.up import Service, start, stop_all, wait_ready

QUESTION = "What colour is the circle?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def circle_png() -> str:
    img = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(img).ellipse((60, 60, 160, 160), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def ttft_worker(http: httpx.Client, url: str, image: str, model: str | None = None) -> float:
    """TTFT of /worker_chat_stream at `url`: the worker itself, or the controller when `model` is given."""
    body = {
        **({"model": model} if model else {}),
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        "images": [image],
        "temperature": 0,
        "max_new_tokens": 8,
    }
    t0 = time.perf_counter()
    with http.stream("POST", url + "/worker_chat_stream", json=body) as resp:
        splitter = FrameSplitter()
        first = None
        for chunk in resp.iter_bytes():
            for raw in splitter.feed(chunk):
                if first is None and decode_frame(raw).text.strip():
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the worker sent no text")
    return first


def ttft_api(http: httpx.Client, url: str, model: str, image: str) -> float:
    body = {
        "model": model,
        "stream": True,
        "temperature": 0,
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
    }
    t0 = time.perf_counter()
    with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        first = None
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the API sent no text")
    return first


def on_cpu_seconds(pid: int) -> float | None:
    """CPU time of all of a process's threads so far (Linux), or None where /proc does not tell."""
    try:
        return sum(int(Path(f).read_text().split()[0]) for f in glob.glob(f"/proc/{pid}/task/*/schedstat")) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def cpu_per_request(services: list[Service], send: Callable[[], float], n: int) -> dict[str, float] | None:
    """Milliseconds of CPU each service spends per request sent by `send` (n requests)."""
    before = {s.name: on_cpu_seconds(s.proc.pid) for s in services}
    for _ in range(n):
        send()
    after = {s.name: on_cpu_seconds(s.proc.pid) for s in services}
    if any(v is None for v in [*before.values(), *after.values()]):
        return None
    return {k: (after[k] - before[k]) * 1000 / n for k in before}  # type: ignore[operator]


def three_paths(http: httpx.Client, url: dict[str, str], api_name: str) -> dict[str, Callable[[], float]]:
    """The same chat sent to the worker, the controller and the API at `url` (once a model is registered)."""
    deadline = time.monotonic() + 60
    while not (models := http.post(url["controller"] + "/list_models").json()["models"]):
        assert time.monotonic() < deadline, "the worker never registered"
        time.sleep(0.2)
    image = circle_png()
    return {
        "worker direct": lambda: ttft_worker(http, url["worker"], image),
        "through the controller": lambda: ttft_worker(http, url["controller"], image, models[0]),
        api_name: lambda: ttft_api(http, url["api"], models[0], image),
    }


def alternate(paths: dict[str, Callable[[], float]], rounds: int, warm: int = 3) -> dict[str, list[float]]:
    """TTFTs of each path, the paths taking turns so machine noise hits them alike; `warm` rounds first."""
    for _ in range(warm):
        for send in paths.values():
            send()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in tqdm(range(rounds), desc="rounds"):
        for name, send in paths.items():
            times[name].append(send())
    return times


def stack(model_path: str | None, log_dir: Path, worker_threads: int = 0) -> tuple[list[Service], dict[str, str]]:
    ports = {name: free_port() for name in ("controller", "worker", "api")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    model = ["--model-path", model_path] if model_path else []
    argvs = {
        "controller": ["llava_serve.controller", "--host", "127.0.0.1", "--port", str(ports["controller"])],
        "worker": ["llava_serve.model_worker", "--host", "127.0.0.1", "--port", str(ports["worker"]),
                   "--worker-address", url["worker"], "--controller-address", url["controller"], *model,
                   "--threads", str(worker_threads)],
        "api": ["llava_serve.openai_api", "--host", "127.0.0.1", "--port", str(ports["api"]),
                "--controller-address", url["controller"]],
    }  # fmt: skip
    ready = {"controller": "/health", "worker": "/ready", "api": "/health"}
    services = []
    for name, argv in argvs.items():
        services.append(start(name, argv, ports[name], ready[name], "127.0.0.1", log_dir))
        wait_ready(services[-1], timeout=180)
    return services, url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--model-path", default=None)
    p.add_argument("--cpu-requests", type=int, default=50, help="requests a path for the CPU figures (0: none)")
    p.add_argument(
        "--worker-threads", type=int, default=0,
        help="the worker's --threads (0: its tuner picks; 1 leaves a core to the controller and the API)",
    )  # fmt: skip
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llava-serve-bench-") as tmp:
        services, url = stack(args.model_path, Path(tmp), args.worker_threads)
        try:
            with httpx.Client(timeout=120) as http:
                paths = three_paths(http, url, "through the API")
                direct, ctrl, api = alternate(paths, args.rounds).values()
                runs = args.cpu_requests
                cpu = {name: cpu_per_request(services, send, runs) for name, send in paths.items()} if runs > 0 else {}
        finally:
            stop_all(services)
    d, c, a = statistics.median(direct), statistics.median(ctrl), statistics.median(api)
    print(f"TTFT median over {args.rounds} rounds: worker direct {d * 1000:.1f} ms, through the controller "
          f"{c * 1000:.1f} ms, through the API {a * 1000:.1f} ms")  # fmt: skip
    print(f"controller / direct: {c / d:.3f}")
    print(f"API / direct: {a / d:.3f}  (p90 {statistics.quantiles(api, n=10)[-1] * 1000:.1f} ms vs "
          f"{statistics.quantiles(direct, n=10)[-1] * 1000:.1f} ms)")  # fmt: skip
    if cpu and all(v is not None for v in cpu.values()):
        print(f"CPU ms per request ({args.cpu_requests} requests a path, 8 tokens each):")
        for name, per in cpu.items():
            assert per is not None
            print(f"  {name:24s} " + "  ".join(f"{svc} {ms:5.2f}" for svc, ms in per.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
