"""The worker process: check the flags, load the model and engine in a thread that exits, serve."""

from __future__ import annotations

import logging
import sys

from llava_serve.common.serve import rate_limit_logs
from llava_serve.errors import ModelLoadError
from llava_serve.worker.config import worker_config


def main(argv: list[str] | None = None) -> int:
    config = worker_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rate_limit_logs()
    from llava_serve.worker.loading import load_model_and_engine
    from llava_serve.worker.server import serve

    try:
        lm, engine = load_model_and_engine(config)
    except ModelLoadError as exc:
        print(f"llava-serve worker: cannot load the model: {exc}", file=sys.stderr)
        return 2
    serve(config, lm, engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
