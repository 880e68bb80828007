"""llama.cpp's `llama-server` as a peer: the bench checkpoint as GGUF, driven over HTTP.

One server per variant (f32, q8_0, q4_0 weights), started as a user would for concurrent clients:
`-np N` slots with continuous batching (its default), `-t/-tb` threads, the KV cache in f32 as
llava-serve's (llama.cpp's default is f16), and the same requests through its OpenAI-compatible
`/v1/chat/completions`, streamed (openai_stream.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from llava_serve.tools.bench_child import Child, free_port
from llava_serve.tools.bench_client import LevelSummary, summarize
from llava_serve.tools.bench_workload import make_requests
from llava_serve.tools.peers import split_variant
from llava_serve.tools.peers.openai_stream import drive_chat

VARIANTS = ("f32", "q8_0", "q4_0")
SLOT_CONTEXT = 1024  # tokens per slot: a bench prompt (~100 text + 64 image) plus 128 new, with room


class LlamaServer(Child):
    def __init__(self, spec: str, text: Path, mmproj: Path, args: argparse.Namespace) -> None:
        self.engine = f"llama.cpp-{spec}"
        variant, n_threads = split_variant(spec, args.peer_threads)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        slots = max(args.levels)
        threads = str(n_threads)
        self.variant, self.slots, self.threads = variant, slots, threads
        self.version = server_version(args.llama_server)
        argv = ["-m", str(text), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["-np", str(slots), "-c", str(SLOT_CONTEXT * slots), "-t", threads, "-tb", threads]
        argv += ["-ctk", "f32", "-ctv", "f32", "--no-webui", "--log-disable"]
        log = args.out / f"peer-{self.engine}.log"
        super().__init__(self.engine, argv, log, program=[str(args.llama_server)], stdout=subprocess.DEVNULL)

    def describe(self) -> str:
        return (
            f"{self.engine}: llama-server {self.version} over HTTP (/v1/chat/completions, streamed), "
            f"{self.variant} GGUF + f32 mmproj, -np {self.slots} continuous batching, KV cache f32, "
            f"{self.threads} threads"
        )

    def ready(self) -> bool:
        self.check_alive()
        try:
            return httpx.get(self.url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.engine} not ready after {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def run_level(self, n: int, args: argparse.Namespace, repeat: int) -> LevelSummary:
        requests = make_requests(n, round_id=repeat)
        url = self.url + "/v1/chat/completions"
        with tqdm(
            total=n * args.max_new_tokens, desc=f"{self.engine} x{n}", unit="tok", leave=False, disable=None
        ) as bar:
            results, wall, sampler = asyncio.run(
                drive_chat(url, requests, args.max_new_tokens, self.pid, args.timeout, bar.update)
            )
        return summarize(self.engine, n, args.max_new_tokens, results, wall, sampler, repeat)

    def warm_up(self) -> None:
        asyncio.run(drive_chat(self.url + "/v1/chat/completions", make_requests(2, round_id=-1), 8, self.pid, 300))


def server_version(server: Path) -> str:
    try:
        out = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "?"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return lines[0].split(":", 1)[1].strip() if lines else "?"


def missing(args: argparse.Namespace) -> str | None:
    """Why the llama.cpp peer cannot run, or None."""
    server = args.llama_server
    if server is None:
        return "--peer llama.cpp needs --llama-server PATH (a llama-server binary)"
    if not (Path(server).is_file() and os.access(server, os.X_OK)):
        return f"--llama-server {server}: not an executable file"
    return None


def start(args: argparse.Namespace, model: Path) -> list[LlamaServer]:
    from llava_serve.tools.peers.llamacpp_convert import convert, gguf_paths, missing_converter

    servers = []
    out_dir = args.peer_dir / "gguf"
    for spec in args.llama_variants:
        variant, _ = split_variant(spec, args.peer_threads)
        if variant not in VARIANTS:
            raise SystemExit(f"--llama-variants: {variant!r} is not one of {', '.join(VARIANTS)}")
        if not all(p.is_file() for p in gguf_paths(out_dir, variant)):
            why = missing_converter(args.llama_cpp_dir)
            if why:
                raise SystemExit(f"{why} (GGUF files for {variant} not in {out_dir} yet)")
            quantize = Path(args.llama_server).with_name("llama-quantize")
            convert(model, out_dir, variant, args.llama_cpp_dir, args.export_python, quantize)
        text, mmproj = gguf_paths(out_dir, variant)
        servers.append(LlamaServer(spec, text, mmproj, args))
    return servers
