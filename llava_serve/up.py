"""`llava-serve up`: controller, worker(s), OpenAI API and web demo on one machine, one command.

Each service runs as its own process (as in a real deployment); this command starts them in order,
waits until each is ready, prints the URLs, and on Ctrl-C stops them all, newest first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llava_serve.common.attest import SECRET_ENV, new_secret
from llava_serve.common.connections import port_free
from llava_serve.worker.config import MODEL_KEYS, WorkerConfig, add_model_args


@dataclass
class Service:
    name: str
    url: str
    ready_path: str
    proc: subprocess.Popen[bytes]
    log: Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-serve up", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="bind address of every service")
    p.add_argument("--controller-port", type=int, default=21001)
    p.add_argument("--worker-port", type=int, default=21002, help="first worker's port; more count up")
    p.add_argument("--api-port", type=int, default=8000)
    p.add_argument("--web-port", type=int, default=7860)
    p.add_argument("--no-api", action="store_true")
    p.add_argument("--no-web", action="store_true")
    p.add_argument("--workers", type=int, default=1, help="workers per model")
    p.add_argument("--limit-model-concurrency", type=int, default=8)
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--ready-timeout", type=float, default=600)
    add_model_args(p, several=True)  # default: the bundled model
    return p


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], int, str]]:
    """(name, python -m argv, port, ready path) for every service, in start order."""
    host = args.host
    ctrl = f"http://{host}:{args.controller_port}"
    items = [
        (
            "controller",
            ["llava_serve.controller", "--host", host, "--port", str(args.controller_port)],
            args.controller_port,
            "/health",
        )
    ]
    model_flags = []
    for flag in ("model_base", "device", "dtype", "quantization", "vision_tower", "conv_template"):
        value = getattr(args, flag)
        if value:
            model_flags += [f"--{flag.replace('_', '-')}", value]
    for flag in ("load_8bit", "load_4bit", "trust_remote_code"):
        if getattr(args, flag):
            model_flags.append(f"--{flag.replace('_', '-')}")
    port = args.worker_port
    for model in args.model_path or [None]:
        for _ in range(args.workers):
            argv = [
                "llava_serve.model_worker",
                "--host",
                host,
                "--port",
                str(port),
                "--controller-address",
                ctrl,
                "--worker-address",
                f"http://{host}:{port}",
                "--limit-model-concurrency",
                str(args.limit_model_concurrency),
                *model_flags,
            ]
            if model:
                argv += ["--model-path", model]
            items.append((f"worker:{port}", argv, port, "/ready"))
            port += 1
    if not args.no_api:
        items.append(
            (
                "api",
                ["llava_serve.openai_api", "--host", host, "--port", str(args.api_port), "--controller-address", ctrl],
                args.api_port,
                "/health",
            )
        )
    if not args.no_web:
        items.append(
            (
                "web",
                ["llava_serve.web", "--host", host, "--port", str(args.web_port), "--controller-url", ctrl],
                args.web_port,
                "/",
            )
        )
    return items


def start(
    name: str, argv: list[str], port: int, ready: str, host: str, log_dir: Path, secret: str | None = None
) -> Service:
    """Start one service; `secret` goes to the controller and workers only, in the environment
    (not argv, which every user of the machine can read in `ps`)."""
    log = log_dir / f"{name.replace(':', '-')}.log"
    env = dict(os.environ)
    env.pop(SECRET_ENV, None)
    if secret and (name == "controller" or name.startswith("worker:")):
        env[SECRET_ENV] = secret
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=fh, stderr=subprocess.STDOUT, env=env)
    return Service(name, f"http://{host}:{port}", ready, proc, log)


def wait_ready(svc: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    shown = time.monotonic()
    while time.monotonic() < deadline:
        if svc.proc.poll() is not None:
            tail = svc.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{svc.name} exited with status {svc.proc.returncode}; its log ends:\n{tail}")
        try:
            if httpx.get(svc.url + svc.ready_path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - shown > 10:
            print(f"  still waiting for {svc.name} (log: {svc.log})", file=sys.stderr, flush=True)
            shown = time.monotonic()
        time.sleep(0.25)
    raise RuntimeError(f"{svc.name} was not ready after {timeout:.0f} s; see {svc.log}")


def stop_all(services: list[Service]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan children
    for svc in reversed(services):
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for svc in reversed(services):
        try:
            svc.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:  # the workers' model flags, checked together before any process starts
        WorkerConfig(**{key: getattr(args, key) for key in MODEL_KEYS})
    except ValueError as exc:
        print(f"llava-serve up: {exc}", file=sys.stderr)
        return 2
    items = plan(args)
    taken = [f"{name} port {port}" for name, _, port, _ in items if not port_free(args.host, port)]
    if taken:
        print(
            "llava-serve up: already in use: "
            + ", ".join(taken)
            + " (stop what uses them, or pick other ports with --controller-port/--worker-port/--api-port/"
            "--web-port)",
            file=sys.stderr,
        )
        return 2
    if not args.model_path:
        from llava_serve.errors import ModelLoadError
        from llava_serve.worker.loading import resolve_model_path

        try:
            resolve_model_path(None)
        except ModelLoadError as exc:
            print(f"llava-serve up: {exc}", file=sys.stderr)
            return 2
    for path in args.model_path:  # before any process starts: a typo fails in a second, not after a load
        if not Path(path).expanduser().is_dir():
            print(f"llava-serve up: --model-path {path}: no such folder", file=sys.stderr)
            return 2
    log_dir = args.log_dir or new_log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    secret = os.environ.get(SECRET_ENV) or new_secret()  # registration is authenticated, always

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i, (name, cmd, port, ready) in enumerate(items, 1):
            print(f"[{i}/{len(items)}] starting {name} ...", flush=True)
            svc = start(name, cmd, port, ready, args.host, log_dir, secret)
            services.append(svc)
            wait_ready(svc, args.ready_timeout)
        print_urls(services, log_dir)
        while all(s.proc.poll() is None for s in services):
            time.sleep(0.5)
        dead = [s.name for s in services if s.proc.poll() is not None]
        print(f"llava-serve up: {', '.join(dead)} stopped unexpectedly; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"llava-serve up: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(services)
        print("all services stopped", flush=True)


KEEP_RUNS = 5


def new_log_dir(root: Path | None = None) -> Path:
    """A folder for this run's logs under ~/.local/state/llava-serve/logs (XDG_STATE_HOME honoured);
    only the newest KEEP_RUNS runs' folders are kept."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    root = root or state / "llava-serve" / "logs"
    root.mkdir(parents=True, exist_ok=True)
    runs = sorted(p for p in root.glob("up-*") if p.is_dir())
    for old in runs[: max(0, len(runs) - (KEEP_RUNS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return root / f"up-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def print_urls(services: list[Service], log_dir: Path) -> None:
    print("\nllava-serve is up:")
    for svc in services:
        label = {"controller": "controller", "api": "OpenAI API (base_url …/v1)", "web": "web demo"}.get(
            svc.name, svc.name
        )
        print(f"  {label:<28} {svc.url}")
    print(f"  logs in {log_dir}\nPress Ctrl-C to stop.", flush=True)
