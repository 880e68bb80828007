"""`llava-serve bench`: the engines compared under the same streaming load, in one run.

One real worker process per engine (`python -m llava_serve.model_worker --engine batch|generate`,
the same `--limit-model-concurrency` for both, so the comparison is of the engine design), and
the same requests as one static `model.generate` batch in a subprocess (the bar to beat). For
each concurrency level, N clients each stream one request (own image, own prompt, greedy,
EOS ignored) and the engines run back to back, so slow drift of a shared machine hits all alike.

    llava-serve bench                                   # 1,4,8,16,32 clients x 128 tokens
    llava-serve bench --concurrency 1,16 --max-new-tokens 32   # a quick subset
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from llava_serve.tools import peers
from llava_serve.tools.bench_child import STATIC_MARK, Child, LineChild, free_port
from llava_serve.tools.bench_client import LevelSummary, Sampler, drive, summarize
from llava_serve.tools.bench_report import ratio_table, target_lines, write_all
from llava_serve.tools.bench_workload import make_requests

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "llava-serve" / "bench-llava"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="llava-serve bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model-path", help="checkpoint to serve (default: build the random ~170M LLaVA once)")
    p.add_argument("--size", default="bench", help="builder size when the checkpoint is built (default: bench)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="where the built checkpoint is kept")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json/.md and bench.png")
    p.add_argument("--concurrency", default="1,4,8,16,32", help="comma-separated client counts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--engines",
        default="batch,generate",
        help="workers to start: batch, generate (none: peers only); ENGINE@N runs it with OMP_NUM_THREADS=N, "
        "ENGINE:DTYPE with --dtype DTYPE, ENGINE:int8 / ENGINE:int4 with --quantization "
        "(e.g. batch,batch:int8,batch:int4)",
    )
    p.add_argument("--no-static", action="store_true", help="skip the static model.generate batch")
    p.add_argument("--limit-model-concurrency", type=int, default=32, help="passed to every worker alike")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="rounds per level; tables show the median")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one round may take")
    peers.add_arguments(p)
    args = p.parse_args(argv)
    peers.parse(args, p.error)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip() and e.strip() != "none"]
    if max(args.levels) > args.limit_model_concurrency + args.max_queue:
        p.error("more clients than a worker admits: raise --limit-model-concurrency or --max-queue")
    return args


def ensure_model(args: argparse.Namespace) -> Path:
    if args.model_path:
        return Path(args.model_path)
    path = args.model_dir / args.size
    if (path / "config.json").is_file():
        print(f"reusing the benchmark checkpoint in {path}")
        return path
    from llava_serve.tools.checkpoints.build import build

    print(f"building the random '{args.size}' LLaVA checkpoint into {path} (once)")
    build("llava", args.size, path)
    return path


class Worker(Child):
    """`spec` is batch or generate, optionally :DTYPE (the worker's --dtype, or int8 / int4 for
    --quantization) and @N (OMP_NUM_THREADS=N), e.g. batch:bfloat16, batch:int8 or generate@1."""

    def __init__(self, spec: str, model: Path, args: argparse.Namespace) -> None:
        self.port = free_port()
        engine, _, threads = spec.partition("@")
        engine, _, dtype = engine.partition(":")
        self.engine = spec
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["llava_serve.model_worker", "--no-register", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--model-path", str(model), "--engine", engine, "--device", args.device, "--log-level", "warning"]
        argv += ["--limit-model-concurrency", str(args.limit_model_concurrency), "--max-queue", str(args.max_queue)]
        if dtype in ("int8", "int4"):  # the batch engine's integer weights
            argv += ["--quantization", dtype]
        elif dtype:
            argv += ["--dtype", dtype]
        env = {"OMP_NUM_THREADS": threads} if threads else None
        log = args.out / f"worker-{spec.replace(':', '-')}.log"
        super().__init__(f"{spec} worker", argv, log, env=env, stdout=subprocess.DEVNULL)

    def ready(self) -> bool:
        self.check_alive()
        try:
            return httpx.get(self.url + "/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


class StaticRunner(LineChild):
    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        argv = ["llava_serve.tools.bench_static", "--model-path", str(model), "--device", args.device]
        super().__init__("static batch", argv, args.out / "static.log", mark=STATIC_MARK)

    def run(self, n: int, max_new_tokens: int, round_id: int = 0) -> dict:
        return self.ask({"n": n, "max_new_tokens": max_new_tokens, "round": round_id})


def wait_ready(workers: list[Worker], static: StaticRunner | None, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(workers)
    print("loading the model in each benchmark process...", flush=True)
    with tqdm(total=len(workers) + (static is not None), desc="processes ready", disable=None) as bar:
        if static is not None:
            static.wait_loaded()
            bar.update()
        while pending:
            pending = [w for w in pending if not w.ready()]
            bar.n = len(workers) - len(pending) + (static is not None)
            bar.refresh()
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after {timeout:.0f} s: {[w.engine for w in pending]}")
            time.sleep(0.5)


def run_worker_level(worker: Worker, n: int, args: argparse.Namespace, repeat: int) -> LevelSummary:
    requests = make_requests(n, round_id=repeat)
    url = worker.url + "/worker_generate_stream"
    total = n * args.max_new_tokens
    if not sys.stderr.isatty():  # no progress bar: say what is running
        print(f"{worker.engine:>8} x{n:<3} running ({total} tokens)...", flush=True)
    with tqdm(total=total, desc=f"{worker.engine} x{n}", unit="tok", leave=False, disable=None) as bar:
        results, wall, sampler = asyncio.run(
            drive(url, requests, args.max_new_tokens, worker.pid, args.timeout, bar.update)
        )
    return summarize(worker.engine, n, args.max_new_tokens, results, wall, sampler, repeat)


def run_static_level(static: StaticRunner, n: int, args: argparse.Namespace, repeat: int) -> LevelSummary:
    async def measured() -> tuple[dict, Sampler]:
        with Sampler(static.pid) as sampler:
            answer = await asyncio.to_thread(static.run, n, args.max_new_tokens, repeat)
        return answer, sampler

    a, sampler = asyncio.run(measured())
    nan = float("nan")
    return LevelSummary(
        engine="static",
        concurrency=n,
        max_new_tokens=args.max_new_tokens,
        requests=n,
        errors=0,
        wall_s=a["wall_s"],
        tokens=a["tokens"],
        tokens_per_s=a["tokens"] / a["wall_s"],
        requests_per_s=n / a["wall_s"],
        ttft_p50_s=a["ttft_s"],
        ttft_p95_s=a["ttft_s"],
        itl_p50_ms=a["step_ms"],
        itl_p95_ms=nan,
        tpot_mean_ms=a["step_ms"],
        frames_per_token=nan,
        peak_rss_mib=sampler.peak_mib,
        other_load_cores=sampler.other_load,
        repeat=repeat,
    )


def warm_up(workers: list[Worker], static: StaticRunner | None, args: argparse.Namespace) -> None:
    """One short request through every process: first-call costs stay out of the figures."""
    for worker in workers:
        asyncio.run(drive(worker.url + "/worker_generate_stream", make_requests(2, round_id=-1), 8, worker.pid, 300))
    if static is not None:
        static.run(2, 8, round_id=-1)


def describe(row: LevelSummary) -> str:
    return (
        f"{row.engine:>8} x{row.concurrency:<3} {row.tokens_per_s:7.1f} tok/s  TTFT p50 {row.ttft_p50_s:6.2f} s  "
        f"ITL p50 {row.itl_p50_ms:6.0f} ms  {row.requests_per_s:5.2f} req/s  RSS {row.peak_rss_mib:6.0f} MiB  "
        f"other load {row.other_load_cores:4.2f} cores"
        + (f"  {row.errors} errors: {row.first_error}" if row.errors else "")
    )


def machine() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    return f"{platform.machine()} {os.cpu_count()} CPUs ({cpu_model()}), OMP_NUM_THREADS={threads}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the workers
    args.out.mkdir(parents=True, exist_ok=True)
    commit, started = git_commit(), datetime.datetime.now().isoformat(timespec="seconds")  # what the workers run
    model = ensure_model(args)
    if unavailable := peers.missing(args):
        print("\n".join(unavailable), file=sys.stderr)
        return 2
    peer_list = peers.start(args, model)  # exports/conversions first: they would disturb the workers' rounds
    workers = [Worker(engine, model, args) for engine in args.engine_list]
    static = None if args.no_static else StaticRunner(model, args)
    rows: list[LevelSummary] = []
    try:
        wait_ready(workers, static)
        for peer in peer_list:
            peer.wait_ready()
            peer.warm_up()
        warm_up(workers, static, args)
        for n in args.levels:
            for repeat in range(args.repeat):  # engines back to back, each round with fresh images
                for worker in workers:
                    rows.append(run_worker_level(worker, n, args, repeat))
                    print(describe(rows[-1]), flush=True)
                if static is not None:
                    rows.append(run_static_level(static, n, args, repeat))
                    print(describe(rows[-1]), flush=True)
                for peer in peer_list:
                    rows.append(peer.run_level(n, args, repeat))
                    print(describe(rows[-1]), flush=True)
    finally:
        for child in [*workers, *([static] if static else [])]:
            child.stop()
        peers.stop_all(peer_list)
    meta = {
        "command": "llava-serve bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": f"random LLaVA '{args.size}' ({model})" if not args.model_path else str(model),
        "machine": machine(),
        "date": started,
        "commit": commit,
        "limit_model_concurrency": args.limit_model_concurrency,
        "max_new_tokens": args.max_new_tokens,
        "repeat": args.repeat,
        "title": f"{model.name}: {args.max_new_tokens} new tokens per client, {os.cpu_count()} CPUs",
        "peers": peers.describe(args, peer_list),
    }
    paths = write_all(rows, meta, args.out)
    print("\n" + ratio_table(rows) + "\n\n" + "\n".join(target_lines(rows)))
    print(f"\nwrote {paths['markdown']}, {paths['json']} and {paths['plot']}")
    if not peer_list:
        print("\n" + peers.HOW_TO_ADD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
