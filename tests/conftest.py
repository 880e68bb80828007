"""Shared fixtures: tiny random checkpoints built offline once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_serve.tools.checkpoints.build import build


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: build(kind, "tiny", root / kind) for kind in ("llava", "llava-next", "text")}


@pytest.fixture(scope="session")
def tiny_llava(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["llava"]
