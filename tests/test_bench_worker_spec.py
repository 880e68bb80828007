"""`llava-serve bench --engines`: ENGINE[:DTYPE][@THREADS] becomes the worker's flags and environment."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from llava_serve.tools import bench, bench_child


@pytest.mark.parametrize(
    ("spec", "engine", "dtype", "threads"),
    [
        ("batch", "batch", None, None),
        ("batch:bfloat16", "batch", "bfloat16", None),
        ("generate:float32@1", "generate", "float32", "1"),
    ],
)
def test_engine_spec_sets_engine_dtype_and_threads(monkeypatch, tmp_path: Path, spec, engine, dtype, threads):
    started: dict = {}

    class FakePopen:
        def __init__(self, command, env, **_):
            started.update(command=command, env=env)

    monkeypatch.setattr(bench_child.subprocess, "Popen", FakePopen)
    args = argparse.Namespace(device="cpu", limit_model_concurrency=8, max_queue=16, out=tmp_path)
    worker = bench.Worker(spec, tmp_path / "model", args)
    command = started["command"]
    assert command[command.index("--engine") + 1] == engine
    assert (command[command.index("--dtype") + 1] if "--dtype" in command else None) == dtype
    assert started["env"].get("OMP_NUM_THREADS") == (threads or bench_child.os.environ.get("OMP_NUM_THREADS"))
    assert worker.engine == spec and ":" not in worker.log_path.name
