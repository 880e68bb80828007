"""`python -m llava_serve.web` (and `llava-serve web`): serve the Gradio demo with uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from llava_serve.web.app import create_app
from llava_serve.web.config import config_from_args
from llava_serve.web.uploads import private_uploads


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info(
        "web demo on http://%s:%d, controller %s", config.host, config.port, config.controller_url
    )
    with private_uploads(config):  # before the app: Gradio reads the folder when it is built
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
