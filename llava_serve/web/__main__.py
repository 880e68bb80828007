"""`python -m llava_serve.web` (and `llava-serve web`): serve the Gradio demo with uvicorn."""

from __future__ import annotations

import logging
import signal

from llava_serve.web.config import config_from_args


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    # gradio and the server load after the flags are read: --help is instant
    from llava_serve.common.serve import configure_logging, run_app
    from llava_serve.web.app import create_app
    from llava_serve.web.uploads import private_uploads

    configure_logging("info")
    logging.getLogger(__name__).info(
        "web demo on http://%s:%d, controller %s", config.host, config.port, config.controller_url
    )
    # uvicorn shuts down on SIGTERM and then raises the signal again with the handler it found: with
    # the default one the process died there, before the upload folder (users' pictures) was removed
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with private_uploads(config):  # before the app: Gradio reads the folder when it is built
        run_app(create_app(config), config.host, config.port, "info", config.connections)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
