"""Load a model and build its engine: the one way the worker, `llava-serve chat` and `generate` do it.

Loading runs in a thread that exits (`run_in_fresh_thread`), so the engine's thread is then the only
one with an OpenMP team (see engine/threads.py). Nothing here imports the HTTP server.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_serve.errors import ModelLoadError
from llava_serve.worker.config import MODEL_KEYS, WorkerConfig

if TYPE_CHECKING:  # torch loads when a model does, not when flags are parsed
    from llava_serve.engine.base import EngineBase
    from llava_serve.models.base import LoadedModel


def config_from_model_args(args: argparse.Namespace, **overrides: Any) -> WorkerConfig:
    """A WorkerConfig from the flags of `add_model_args` (chat and generate have no others)."""
    config = WorkerConfig(model_path=args.model_path, **{k: getattr(args, k) for k in MODEL_KEYS})
    return replace(config, **overrides) if overrides else config


def load_model_and_engine(config: WorkerConfig) -> tuple[LoadedModel, EngineBase]:
    """The model and a built (not started) engine for it; ModelLoadError says what to fix."""
    from llava_serve.engine.kernel_caches import bound_kernel_caches
    from llava_serve.engine.threads import run_in_fresh_thread
    from llava_serve.models.loader import load_model
    from llava_serve.models.options import read_config, stored_float_dtype
    from llava_serve.models.support import check_engine_support

    bound_kernel_caches(config.limit_model_concurrency)  # before any kernel is made (kernel_caches.py)

    def load() -> tuple[LoadedModel, EngineBase]:
        path = resolve_model_path(config.model_path)
        folder = Path(path).expanduser()
        if (folder / "config.json").is_file():  # else load_model says what is wrong with the folder
            check_engine_support(read_config(folder), config.engine, path)
        options = config.load_options(path)
        if config.quantization and config.dtype is None and folder.is_dir():
            # integer weights are made from the checkpoint's own floats, one layer at a time: a
            # half-precision checkpoint is not widened to float32 first (a 7B model: 13 GB, not 26)
            stored = stored_float_dtype(folder)
            if stored in ("bfloat16", "float16"):
                options = replace(options, dtype=stored)
        lm = load_model(options)
        return lm, build_engine(config, lm)

    return run_in_fresh_thread(load)


def resolve_model_path(model_path: str | None) -> str:
    """The given path, or the bundled default model's folder; a clear error if it is not there."""
    if model_path:
        return model_path
    try:
        from llava_serve.default_model import default_model_path

        path = default_model_path()
    except ImportError:
        path = None
    if path is None or not (path / "config.json").is_file():
        raise ModelLoadError(
            "this installation has no bundled default model; pass --model-path CHECKPOINT "
            "(`llava-serve build-model --kind llava --size small --out DIR` makes a random-weight one for trying "
            "the stack)"
        )
    return str(path)


def build_engine(config: WorkerConfig, lm: LoadedModel) -> EngineBase:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if config.engine == "generate":
        from llava_serve.engine.generate_engine import GenerateEngine

        return GenerateEngine(lm, max_running=config.limit_model_concurrency, max_waiting=config.max_queue)
    from llava_serve.engine.engine import BatchEngine

    return BatchEngine(
        lm,
        max_running=config.limit_model_concurrency,
        max_waiting=config.max_queue,
        feature_cache_size=config.feature_cache_size,
        prepack=not config.no_prepack,
        adapt_threads=not config.threads,
        quantization=config.quantization,
    )
