"""The web demo: a Gradio chat that talks only to the controller over HTTP (and, to build a
prompt, to the worker the controller names). Build it with `create_app(WebConfig(...))`."""

from llava_serve.web.app import create_app
from llava_serve.web.config import WebConfig
from llava_serve.web.demo import create_demo

__all__ = ["WebConfig", "create_app", "create_demo"]
