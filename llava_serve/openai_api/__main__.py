"""`python -m llava_serve.openai_api` / `llava-serve api`."""

from __future__ import annotations

import logging

from llava_serve.openai_api.config import build_parser, config_from_args

logger = logging.getLogger("llava_serve.openai_api")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        config = config_from_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    from llava_serve.common.serve import configure_logging, run_app, warn_if_exposed  # after the flags: fast --help
    from llava_serve.openai_api.app import create_app

    configure_logging(config.log_level)
    warn_if_exposed(logger, config.host, config.api_keys)
    run_app(create_app(config), config.host, config.port, config.log_level, config.connections)


if __name__ == "__main__":
    main()
