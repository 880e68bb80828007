"""Ray Serve: the same load on 1 replica and on 2 replicas on two local Ray nodes, in one run.

    python benchmarks/ray_scale.py [--model-path P] [--clients 8] [--tokens 128] [--rounds 3]

Starts a two-node Ray cluster on this machine (Ray's cluster_utils: two raylets, each with
--cpus-per-node CPUs and one `llava_replica` slot, so replicas land on different nodes), deploys the
app (llava_serve.ray) with one replica of one thread per CPU of its node, and drives N streaming
clients through Serve's HTTP proxy (LLaVA's /worker_generate_stream, one picture each, greedy,
`--tokens` new tokens with ignore_eos: the same work every round). Then it scales the deployment to 2
replicas (a config update: the second replica starts on the other node) and drives the same load
again. Prints tokens/s per round, the medians and their ratio; `--out FILE` writes them as JSON.
The clients share the machine with both nodes: on a 2-core machine the figure says that it works
and scales replicas, not how fast two real machines would be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from llava_serve.tools.bench_client import LevelSummary, drive, summarize
from llava_serve.tools.bench_workload import make_requests

ROOT = Path(__file__).resolve().parents[1]
APP = "llava"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_args(model_path: str | None, replicas: int, cpus: int, concurrency: int) -> dict[str, Any]:
    model = {
        "min_replicas": replicas,
        "max_replicas": replicas,
        "num_cpus": cpus,
        "resources": {"llava_replica": 1},
        "limit_model_concurrency": concurrency,
        "max_ongoing_requests": 2 * concurrency,
        "max_queued_requests": 4 * concurrency,
    }
    if model_path:
        model["model_path"] = model_path
    return {"models": [model]}


def running(deployment: str) -> int:
    from ray import serve

    return serve.status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


def wait_running(deployment: str, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while running(deployment) != n:
        if time.monotonic() > deadline:
            raise SystemExit(f"{deployment}: not {n} running replicas after {timeout:.0f} s")
        time.sleep(0.5)


def rounds(url: str, args: argparse.Namespace, label: str) -> list[LevelSummary]:
    out = []
    warm = make_requests(args.clients, round_id=999)
    asyncio.run(drive(url, warm, 8, os.getpid(), timeout=600))  # each replica sees a batch before timing
    for r in range(args.rounds):
        requests = make_requests(args.clients, round_id=r)
        results, wall, sampler = asyncio.run(drive(url, requests, args.tokens, os.getpid(), timeout=600))
        summary = summarize(label, args.clients, args.tokens, results, wall, sampler, repeat=r)
        out.append(summary)
        print(
            f"  {label} round {r + 1}: {summary.tokens_per_s:.1f} tok/s, {summary.errors} errors, "
            f"TTFT p50 {summary.ttft_p50_s:.2f} s, other load {summary.other_load_cores:.2f} cores",
            flush=True,
        )
        if summary.errors:
            print(f"    first error: {summary.first_error}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="checkpoint (default: the bundled llava-shapes)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from llava_serve.ray import app
    from llava_serve.ray.app import deployment_name
    from llava_serve.ray.config import AppConfig

    cpus = args.cpus_per_node
    node = {"num_cpus": cpus, "resources": {"llava_replica": 1}}
    print(f"starting a two-node Ray cluster ({cpus} CPU each) ...", flush=True)
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        url = f"http://127.0.0.1:{port}/worker_generate_stream"
        model = AppConfig.from_dict(app_args(args.model_path, 1, cpus, args.clients)).models[0]
        deployment = deployment_name(model.name)
        summaries: dict[int, list[LevelSummary]] = {}
        for replicas in (1, 2):
            print(f"deploying {replicas} replica(s) ...", flush=True)
            serve.run(app(app_args(args.model_path, replicas, cpus, args.clients)), name=APP, route_prefix="/")
            wait_running(deployment, replicas)
            summaries[replicas] = rounds(url, args, f"{replicas} replica(s)")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
    medians = {n: statistics.median(s.tokens_per_s for s in runs) for n, runs in summaries.items()}
    print(f"\n{args.clients} clients x {args.tokens} tokens, {args.rounds} rounds each, {cpus} CPU per node:")
    for n, runs in summaries.items():
        ttft = statistics.median(s.ttft_p50_s for s in runs)
        print(f"  {n} replica(s): median {medians[n]:.1f} tok/s (TTFT p50 {ttft:.2f} s)")
    ratio = medians[2] / medians[1] if medians[1] else float("nan")
    print(f"  2 replicas / 1 replica: {ratio:.2f}x")
    if args.out is not None:
        data = {
            "command": " ".join(["python", "benchmarks/ray_scale.py", *(argv if argv is not None else sys.argv[1:])]),
            "ratio": ratio,
            "median_tokens_per_s": medians,
            "rounds": {n: [s.as_dict() for s in runs] for n, runs in summaries.items()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
