"""Tiny random original-format LLaVA checkpoints, built offline once per session, and their HF twins."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_serve.models.base import LoadedModel
from llava_serve.models.loader import load_model
from llava_serve.tools.checkpoints.build import build
from llava_serve.tools.checkpoints.hf import SIZES
from llava_serve.tools.checkpoints.original import build_original, convert_to_hf
from tests.models.helpers import options_for


@pytest.fixture(scope="session")
def original_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("original")
    for kind in ("original", "original-projector", "original-lora"):
        build(kind, "tiny", root / kind)
    build_original("original", SIZES["tiny"], root / "anyres", 0, aspect="anyres")
    return root


@pytest.fixture(scope="session")
def load_original(original_root: Path) -> Callable[..., LoadedModel]:
    """Load (and cache) one of the session's checkpoints: load_original('original-lora', load_4bit=True)."""
    cache: dict[tuple, LoadedModel] = {}

    def load(kind: str, **kw) -> LoadedModel:
        key = (kind, tuple(sorted(kw.items())))
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = load_model(options_for(original_root, kind, **kw))
        return cache[key]

    return load


@pytest.fixture(scope="session")
def hf_twin(original_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The same weights written in transformers' layout by builder_original.convert_to_hf."""
    root = tmp_path_factory.mktemp("hf_twins")
    made: dict[str, Path] = {}

    def twin(kind: str) -> Path:
        if kind not in made:
            made[kind] = convert_to_hf(original_root / kind, root / kind)
        return made[kind]

    return twin


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 40), (30, 70))]
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (50, 1))).convert("RGB")
    return [Image.new("RGB", (40, 40), (220, 30, 30)), *noise, gradient, Image.new("RGB", (90, 24), (20, 90, 200))]
