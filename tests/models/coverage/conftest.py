"""Tiny checkpoints of each covered architecture, built once per session, loaded once each."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from llava_serve.models.base import LoadedModel
from llava_serve.models.loader import LoadOptions, load_model
from tests.models.coverage.builders import build_arch


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("coverage")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_arch(arch, root / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def served(checkpoint):
    loaded: dict[str, LoadedModel] = {}

    def get(arch: str) -> LoadedModel:
        if arch not in loaded:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded[arch] = load_model(LoadOptions(model_path=str(checkpoint(arch)), device="cpu", dtype="float32"))
        return loaded[arch]

    return get
