"""`python -m llava_serve.openai_api` / `llava-serve api`."""

from __future__ import annotations

import logging

import uvicorn

from llava_serve.openai_api.app import create_app
from llava_serve.openai_api.config import build_parser, config_from_args

logger = logging.getLogger("llava_serve.openai_api")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        config = config_from_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", config.host)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
