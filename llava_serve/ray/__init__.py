"""llava-serve on Ray Serve: the worker and the OpenAI API as replicas that Serve places on a cluster's
nodes, restarts when they die and scales on load (docs/scale-out.md).

    llava-serve ray up [--model-path P ...]          # a local Ray, the app, Ctrl-C stops both
    serve run llava_serve.ray:app                     # the bundled model
    serve run deploy/ray/serve.yaml                   # a config file (`args:` as in config.py)

`app` is Serve's application builder; nothing here imports ray or torch until it is called, so the
single-machine stack and `llava-serve ray --help` never load them.
"""

from __future__ import annotations

from typing import Any


def app(args: dict[str, Any]) -> Any:
    """The Serve application for a config file's `args:` (an empty mapping: the bundled model)."""
    from llava_serve.ray.app import build_app
    from llava_serve.ray.config import AppConfig

    return build_app(AppConfig.from_dict(args))
