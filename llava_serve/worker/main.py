"""The worker process: check the flags, load the model and engine in a thread that exits, serve."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from llava_serve.common.serve import rate_limit_logs
from llava_serve.errors import ModelLoadError
from llava_serve.worker.config import worker_config

if TYPE_CHECKING:  # torch and the rest load in main, after the flags are checked
    from llava_serve.engine.base import EngineBase
    from llava_serve.models.base import LoadedModel


def main(argv: list[str] | None = None) -> int:
    config = worker_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rate_limit_logs()
    from llava_serve.engine.threads import run_in_fresh_thread
    from llava_serve.models.loader import load_model
    from llava_serve.worker.server import build_engine, resolve_model_path, serve

    def load() -> tuple[LoadedModel, EngineBase]:
        lm = load_model(config.load_options(resolve_model_path(config.model_path)))
        return lm, build_engine(config, lm)

    try:  # in a thread that exits: the engine's thread is then the only one with an OpenMP team
        lm, engine = run_in_fresh_thread(load)
    except ModelLoadError as exc:
        print(f"llava-serve worker: cannot load the model: {exc}", file=sys.stderr)
        return 2
    serve(config, lm, engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
