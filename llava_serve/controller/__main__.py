"""`python -m llava_serve.controller` / `llava-serve controller`."""

from __future__ import annotations

import logging

from llava_serve.controller.config import build_parser, config_from_args

logger = logging.getLogger("llava_serve.controller")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        config = config_from_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    from llava_serve.common.serve import configure_logging, run_app, warn_if_exposed  # after the flags: fast --help
    from llava_serve.controller.app import create_app

    configure_logging(config.log_level)
    warn_if_exposed(logger, config.host, config.api_keys)
    if not config.registration_secret:
        logger.warning(
            "no --registration-secret: only workers on this machine may register (connections from other "
            "hosts to /register_worker, /receive_heart_beat and /unregister_worker are refused with 403)"
        )
    run_app(create_app(config), config.host, config.port, config.log_level, config.connections)


if __name__ == "__main__":
    main()
