"""The peers for real, through `llava-serve bench` on the tiny checkpoint; skipped where a peer is absent.

- OpenVINO: runs when openvino-genai imports under LLAVA_SERVE_OPENVINO_PYTHON (default: this
  interpreter) and optimum-intel under LLAVA_SERVE_EXPORT_PYTHON (default: the same).
- llama.cpp: runs when LLAMA_SERVER names a llama-server binary and LLAMA_CPP_DIR a llama.cpp
  source tree (its converters run under LLAVA_SERVE_EXPORT_PYTHON).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from llava_serve.tools.peers.openvino import has_module

pytestmark = pytest.mark.slow
OPENVINO_PYTHON = os.environ.get("LLAVA_SERVE_OPENVINO_PYTHON", sys.executable)
EXPORT_PYTHON = os.environ.get("LLAVA_SERVE_EXPORT_PYTHON", sys.executable)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava_serve.tools.checkpoints.build import build

    path = tmp_path_factory.mktemp("peers") / "tiny"
    build("llava", "tiny", path)
    return path


def bench_peer(model: Path, tmp_path: Path, *peer_args: str) -> list[dict]:
    from llava_serve.tools.bench import main

    out = tmp_path / "out"
    argv = ["--model-path", str(model), "--engines", "none", "--no-static", "--concurrency", "2"]
    argv += ["--max-new-tokens", "6", "--peer-dir", str(tmp_path / "peers"), "--out", str(out)]
    argv += ["--export-python", EXPORT_PYTHON, *peer_args]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())["results"]


def assert_complete(rows: list[dict], engine: str) -> None:
    (row,) = [r for r in rows if r["engine"] == engine]
    assert row["errors"] == 0, row["first_error"]
    assert row["tokens"] == 2 * 6 and row["tokens_per_s"] > 0 and row["ttft_p50_s"] > 0


@pytest.mark.skipif(
    not (has_module(OPENVINO_PYTHON, "openvino_genai") and has_module(EXPORT_PYTHON, "optimum.intel")),
    reason="OpenVINO GenAI / optimum-intel not installed (pip install -e .[peers]; docs/benchmark.md, 'Peers')",
)
def test_openvino_peer_serves_the_bench_requests(tiny_llava: Path, tmp_path: Path) -> None:
    rows = bench_peer(
        tiny_llava, tmp_path, "--peer", "openvino", "--openvino-variants", "f32", "--openvino-python", OPENVINO_PYTHON
    )
    assert_complete(rows, "openvino-f32")


@pytest.mark.skipif(
    not (os.environ.get("LLAMA_SERVER") and os.environ.get("LLAMA_CPP_DIR")),
    reason="no LLAMA_SERVER binary / LLAMA_CPP_DIR source tree (docs/benchmark.md, 'Peers')",
)
def test_llamacpp_peer_serves_the_bench_requests(tiny_llava: Path, tmp_path: Path) -> None:
    server, source = os.environ["LLAMA_SERVER"], os.environ["LLAMA_CPP_DIR"]
    rows = bench_peer(
        tiny_llava, tmp_path, "--peer", "llama.cpp", "--llama-variants", "f32", "--llama-server", server,
        "--llama-cpp-dir", source,
    )  # fmt: skip
    assert_complete(rows, "llama.cpp-f32")
