"""The web demo as an ASGI app: the Gradio page at `/`, plus `GET /health`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import gradio as gr
from fastapi import FastAPI

from llava_serve.cluster.client import ClusterClient
from llava_serve.web.config import WebConfig, cluster_client, read_auth_file
from llava_serve.web.demo import CSS, create_demo, theme


def create_app(config: WebConfig, client: ClusterClient | None = None) -> FastAPI:
    client = client or cluster_client(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="llava-serve web demo", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.client = client

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    demo = create_demo(config, client)
    app.state.demo = demo
    mounted = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        ssr_mode=False,  # no Node server
        theme=theme(),
        css=CSS,
        max_file_size=f"{config.max_upload_mb}mb",
        footer_links=["gradio", "settings"],
        auth=read_auth_file(config.auth_file) if config.auth_file else None,
        auth_message="llava-serve web demo: sign in",
    )
    # gr.launch() sets this; mount_gradio_app does not, and without it Gradio skips its check that a
    # file named as an input was uploaded (it would copy any server file into its cache and serve it).
    demo.has_launched = True
    return mounted
