"""`llava-serve ray up`: the Ray Serve application on a local Ray (or a cluster's, with --address).

Without --address it starts Ray here (`ray.init`: the GCS, a raylet and their workers are this
process's children), deploys the app, prints the address and waits; Ctrl-C (or SIGTERM) shuts Serve
and that Ray down, so no Ray process outlives the command. With --address it deploys to that
cluster and, on Ctrl-C, deletes only its own application.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from llava_serve.common.connections import port_free
from llava_serve.worker.config import MODEL_KEYS, add_model_args

APP_NAME = "llava"


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a Serve config file (llava_serve.ray:app's `args:`) or the args")
    p.add_argument("--host", default="127.0.0.1", help="the HTTP proxy's bind address")
    p.add_argument("--port", type=int, default=8000, help="the HTTP proxy's port (OpenAI API and worker routes)")
    p.add_argument("--address", default=None, help="a running Ray cluster ('auto' or HOST:PORT); default: start one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all of them)")
    add_model_args(p, several=True)
    s = p.add_argument_group("scaling (per model)")
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--max-replicas", type=int, default=None, help="default: --min-replicas (no autoscaling)")
    s.add_argument("--initial-replicas", type=int, default=None)
    s.add_argument("--target-ongoing-requests", type=float, default=None, help="default: --limit-model-concurrency")
    s.add_argument("--max-ongoing-requests", type=int, default=None, help="per replica; default: 2 x the batch")
    s.add_argument("--max-queued-requests", type=int, default=64, help="beyond these: 429 + Retry-After")
    s.add_argument("--upscale-delay-s", type=float, default=30.0)
    s.add_argument("--downscale-delay-s", type=float, default=600.0)
    r = p.add_argument_group("each replica")
    r.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="also its torch threads")
    r.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    r.add_argument("--limit-model-concurrency", type=int, default=8, help="the engine's running batch")
    r.add_argument("--engine", default="batch", choices=["batch", "generate"])
    r.add_argument("--threads", type=int, default=0, help="torch threads (default: the replica's CPUs)")
    a = p.add_argument_group("API")
    a.add_argument("--api-key", action="append", default=[], help="accepted client key (repeatable)")
    a.add_argument("--allow-remote-images", action="store_true")
    a.add_argument("--upstream-timeout", type=float, default=300.0, help="longest silence of a replica")


def args_of(ns: argparse.Namespace) -> dict[str, Any]:
    """The application's `args:` from the flags (the same mapping a config file holds)."""
    entry: dict[str, Any] = {k: getattr(ns, k) for k in MODEL_KEYS if getattr(ns, k) not in (None, False)}
    entry |= {
        "min_replicas": ns.min_replicas,
        "max_replicas": ns.max_replicas if ns.max_replicas is not None else max(1, ns.min_replicas),
        "max_queued_requests": ns.max_queued_requests,
        "upscale_delay_s": ns.upscale_delay_s,
        "downscale_delay_s": ns.downscale_delay_s,
        "num_cpus": ns.num_cpus_per_replica,
        "num_gpus": ns.num_gpus_per_replica,
        "limit_model_concurrency": ns.limit_model_concurrency,
        "engine": ns.engine,
        "threads": ns.threads,
    }
    for key in ("initial_replicas", "target_ongoing_requests", "max_ongoing_requests"):
        if getattr(ns, key) is not None:
            entry[key] = getattr(ns, key)
    models = [{**entry, "model_path": path} for path in ns.model_path] or [entry]
    api: dict[str, Any] = {"upstream_timeout": ns.upstream_timeout, "allow_remote_images": ns.allow_remote_images}
    if ns.api_key:
        api["api_keys"] = ns.api_key
    return {"models": models, "api": api}


def args_from_file(path: Path) -> dict[str, Any]:
    """A Serve config file's args for llava_serve.ray:app, or a file that is the args mapping alone."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if "applications" not in data:
        return dict(data)
    for application in data["applications"]:
        if application.get("import_path") == "llava_serve.ray:app":
            return dict(application.get("args") or {})
    raise ValueError(f"{path}: no application with import_path llava_serve.ray:app")


def check_paths(args: dict[str, Any]) -> None:
    for entry in args.get("models") or []:
        path = entry.get("model_path")
        if path and not Path(path).expanduser().is_dir():
            raise ValueError(f"model_path {path}: no such folder")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llava-serve ray up", description=__doc__)
    add_up_args(p)
    ns = p.parse_args(argv)
    from llava_serve.errors import ModelLoadError
    from llava_serve.ray.config import AppConfig

    try:
        if ns.config is not None:
            if ns.model_path:
                raise ValueError("give the models either in --config or with --model-path, not both")
            args = args_from_file(ns.config)
        else:
            args = args_of(ns)
        check_paths(args)
        config = AppConfig.from_dict(args)
        if ns.address is None and not port_free(ns.host, ns.port):
            raise ValueError(f"port {ns.port} is in use (stop what uses it, or pick another with --port)")
    except (ValueError, TypeError, OSError, ModelLoadError) as exc:
        print(f"llava-serve ray up: {exc}", file=sys.stderr)
        return 2
    return run(config, ns)


def run(config: Any, ns: argparse.Namespace) -> int:
    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("starting Ray ..." if ns.address is None else f"connecting to Ray at {ns.address} ...", flush=True)
    import ray
    from ray import serve

    from llava_serve.ray.app import build_app

    started_here = ns.address is None
    try:
        if started_here:
            ray.init(num_cpus=ns.num_cpus, include_dashboard=False)
        else:
            ray.init(address=ns.address)
        serve.start(http_options={"host": ns.host, "port": ns.port}, proxy_location="HeadOnly")
        names = ", ".join(m.name for m in config.models)
        print(f"deploying {names} (the model loads in each replica) ...", flush=True)
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        url = f"http://{ns.host}:{ns.port}"
        print(f"\nllava-serve on Ray Serve is up:\n  OpenAI API (base_url …/v1)   {url}/v1\n"
              f"  worker and controller routes {url}\nPress Ctrl-C to stop.", flush=True)  # fmt: skip
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave Ray running
        stop(started_here)
        print("stopped", flush=True)


def stop(started_here: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if started_here:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()  # a Ray started by ray.init() stops with it
