"""`python -m llava_serve.web` (and `llava-serve web`): serve the Gradio demo with uvicorn."""

from __future__ import annotations

import logging

from llava_serve.web.config import config_from_args


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    import uvicorn  # gradio and the server load after the flags are read: --help is instant

    from llava_serve.web.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info(
        "web demo on http://%s:%d, controller %s", config.host, config.port, config.controller_url
    )
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
