"""`python -m llava_serve.controller` / `llava-serve controller`."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from llava_serve.controller.app import create_app
from llava_serve.controller.config import build_parser, config_from_args

logger = logging.getLogger("llava_serve.controller")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        config = config_from_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    if not _is_loopback(config.host) and not config.api_keys:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", config.host)
    if not config.registration_secret:
        logger.warning("no --registration-secret: any process that reaches the controller can register")
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=5,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    main()
