"""Other CPU servers in the benchmark, next to llava-serve: llama.cpp's llama-server and OpenVINO GenAI.

Both are optional. `llava-serve bench --peer openvino` exports the bench checkpoint to OpenVINO
IR and drives GenAI's continuous-batching pipeline; `--peer llama.cpp --llama-server PATH`
converts it to GGUF + mmproj with llama.cpp's converters and drives llama-server over HTTP. Each
peer variant becomes one more "engine" row of the same tables (e.g. `openvino-f32`,
`llama.cpp-q8_0`), measured with the same requests, back to back with the workers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the OpenVINO runner imports this package in a venv that may lack the bench's needs
    from llava_serve.tools.bench_client import LevelSummary

PEERS = ("openvino", "llama.cpp")
DEFAULT_PEER_DIR = Path.home() / ".cache" / "llava-serve" / "bench-llava" / "peers"
HOW_TO_ADD = (
    "peers not in this run. To put them in the same tables: `--peer openvino` (pip install -e '.[peers]'; "
    "the one-time IR export needs optimum-intel: --export-python), `--peer llama.cpp --llama-server PATH "
    "--llama-cpp-dir SRC`; see docs/benchmark.md, 'Peers'."
)


class Peer(Protocol):
    engine: str

    @property
    def pid(self) -> int: ...
    def wait_ready(self) -> None: ...
    def warm_up(self) -> None: ...
    def run_level(self, n: int, args: argparse.Namespace, repeat: int) -> LevelSummary: ...
    def describe(self) -> str: ...
    def stop(self) -> None: ...


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peers (optional; docs/benchmark.md, 'Peers')")
    g.add_argument("--peer", default="", help=f"comma-separated: {', '.join(PEERS)}")
    g.add_argument("--peer-dir", type=Path, default=DEFAULT_PEER_DIR, help="where exported/converted models are kept")
    g.add_argument("--peer-threads", type=int, default=2, help="threads each peer computes with")
    g.add_argument(
        "--openvino-variants", default="f32,int8", help="f32, int8 and/or int4 (weight-only) IR; VARIANT@N: N threads"
    )
    g.add_argument("--openvino-python", default=sys.executable, help="interpreter with openvino-genai")
    g.add_argument("--export-python", default=sys.executable, help="interpreter with optimum-intel / llama.cpp's needs")
    g.add_argument("--llama-server", type=Path, help="a llama-server binary (llama.cpp)")
    g.add_argument("--llama-cpp-dir", type=Path, help="llama.cpp source tree: its GGUF converters")
    g.add_argument(
        "--llama-variants", default="f32,q8_0", help="f32, q8_0 and/or q4_0 GGUF weights; VARIANT@N: N threads"
    )


def parse(args: argparse.Namespace, error) -> None:
    """Split the comma lists; `error` (the parser's) for a peer name it does not know."""
    args.peer_list = [s.strip() for s in args.peer.split(",") if s.strip()]
    unknown = [s for s in args.peer_list if s not in PEERS]
    if unknown:
        error(f"--peer: unknown {', '.join(unknown)} (known: {', '.join(PEERS)})")
    args.openvino_variants = [s.strip() for s in str(args.openvino_variants).split(",") if s.strip()]
    args.llama_variants = [s.strip() for s in str(args.llama_variants).split(",") if s.strip()]


def split_variant(spec: str, threads: int) -> tuple[str, int]:
    """`f32@1` -> ("f32", 1): a variant with its own thread count, as `generate@1` is for the workers."""
    variant, _, n = spec.partition("@")
    return variant, int(n) if n else threads


def missing(args: argparse.Namespace) -> list[str]:
    """What keeps each asked-for peer from running: one line each, empty when all can run."""
    from llava_serve.tools.peers import llamacpp, openvino

    checks = {"openvino": openvino.missing, "llama.cpp": llamacpp.missing}
    return [f"--peer {name}: {why}" for name in args.peer_list if (why := checks[name](args))]


def start(args: argparse.Namespace, model: Path) -> list[Peer]:
    """Export/convert what is not cached yet (with progress), then start every peer variant."""
    from llava_serve.tools.peers import llamacpp, openvino

    peers: list[Peer] = []
    try:
        if "openvino" in args.peer_list:
            peers += openvino.start(args, model)
        if "llama.cpp" in args.peer_list:
            peers += llamacpp.start(args, model)
    except BaseException:
        stop_all(peers)
        raise
    return peers


def describe(args: argparse.Namespace, peers: list[Peer]) -> list[str]:
    """One line per peer variant for the results: what ran, with which settings."""
    return [peer.describe() for peer in peers]


def stop_all(peers: list[Peer]) -> None:
    for peer in peers:
        peer.stop()
