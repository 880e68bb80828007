"""Fixtures of the reliability suite."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.helpers import proc_figures
from tests.reliability.stack import Stack, StackConfig


@pytest.fixture(scope="session")
def long_llava(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random LLaVA with a 4096-token context (RoPE: the weights do not change), so one
    answer can be long enough for its cumulative frames to outgrow every buffer on the way."""
    out = tmp_path_factory.mktemp("long") / "llava"
    shutil.copytree(tiny_llava, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 4096
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


KEYS = {"controller_key": "ctrl-key", "worker_key": "worker-key", "api_key": "sk-api", "secret": "reg-secret"}
# Limits small enough that a 50 MB body is over every service's body limit.
IMAGE_BYTES = 8_000_000


@pytest.fixture(scope="package")
def stack(long_llava: Path) -> Iterator[Stack]:
    """The cluster every process-level test uses: controller, two workers and the API, every
    credential set (as in production), modest image and body limits, and a small admission limit
    (2 running + 2 waiting per worker) so overload is cheap to reach. `stack.fresh`: each process's
    figures right after start, before any request but the workers' registration."""
    config = StackConfig(
        long_llava,
        workers=2,
        limit_model_concurrency=2,
        max_queue=2,
        worker_extra=("--max-images", "2", "--max-image-bytes", str(IMAGE_BYTES), "--max-request-pixels", "50000000"),
        api_extra=("--max-images-per-request", "2", "--max-image-bytes", str(IMAGE_BYTES)),
        controller_extra=("--max-body-bytes", str(32 * 2**20)),
        **KEYS,
    )
    stack = Stack(config).start()
    stack.fresh = {n: proc_figures(p.pid, stack.service_ports) for n, p in stack.procs.items()}
    try:
        yield stack
    finally:
        stack.stop()
