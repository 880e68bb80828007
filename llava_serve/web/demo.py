"""The Gradio page: layout, stable element ids, and which handler each event runs.

Element ids (for browser tests and custom CSS): model-selector, refresh-models, model-status,
image-input, chatbot, msg-input, send-btn, stop-btn, regenerate-btn, clear-btn, temperature,
top-p, max-new-tokens.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from llava_serve.cluster.client import ClusterClient
from llava_serve.web.config import WebConfig, cluster_client
from llava_serve.web.conversation import Conversation
from llava_serve.web.handlers import DemoHandlers

TITLE = "LLaVA chat · llava-serve"
INTRO = (
    "# LLaVA chat\n"
    "Upload an image, ask about it, and the answer streams in. Served by **llava-serve**: "
    "every request goes through the controller to a model worker."
)


# Uploaded pictures shown in the chat at a modest size.
CSS = "#chatbot img { max-height: 220px; width: auto; }"


def theme() -> gr.themes.Base:
    # System fonts only: a demo on a machine without internet must not wait for Google Fonts.
    sans, mono = ["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"]
    return gr.themes.Soft(font=sans, font_mono=mono)


def create_demo(config: WebConfig, client: ClusterClient | None = None) -> gr.Blocks:
    """Build the demo (nothing runs until it is served); `client` defaults to one for config."""
    handlers = DemoHandlers(config, client or cluster_client(config))
    # Uploads older than upload_max_age go at the next sweep (a tenth of that, at least every 10 min).
    sweep = max(1, min(600, config.upload_max_age // 10))
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(sweep, config.upload_max_age)) as demo:
        ui = _layout()
        _wire(demo, ui, handlers, config.concurrency_count)
    demo.queue(api_open=False, default_concurrency_limit=config.concurrency_count)
    return demo


def _layout() -> dict[str, Any]:
    ui: dict[str, Any] = {"conv": gr.State(Conversation())}
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row(equal_height=True):
                ui["model"] = gr.Dropdown(
                    choices=[], value=None, label="Model", interactive=True, scale=4, elem_id="model-selector"
                )
                ui["refresh"] = gr.Button("↻ Refresh", scale=1, min_width=80, elem_id="refresh-models")
            ui["status"] = gr.Markdown(elem_id="model-status")
            ui["image"] = gr.Image(
                type="filepath",
                format="png",
                label="Image",
                sources=["upload", "clipboard"],
                height=280,
                elem_id="image-input",
            )
            with gr.Accordion("Parameters", open=False):
                ui["temperature"] = gr.Slider(
                    0.0, 1.0, value=0.2, step=0.05, label="Temperature", elem_id="temperature"
                )
                ui["top_p"] = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top P", elem_id="top-p")
                ui["max_new_tokens"] = gr.Slider(
                    16, 1024, value=512, step=16, label="Max new tokens", elem_id="max-new-tokens"
                )
        with gr.Column(scale=5):
            ui["chatbot"] = gr.Chatbot(
                label="Chat",
                height=460,
                feedback_options=None,
                buttons=["copy", "copy_all"],
                elem_id="chatbot",
            )
            with gr.Row(equal_height=True):
                ui["text"] = gr.Textbox(
                    show_label=False,
                    placeholder="Ask about the image and press Enter",
                    scale=6,
                    container=False,
                    elem_id="msg-input",
                )
                ui["send"] = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send-btn")
            with gr.Row():
                ui["stop"] = gr.Button("Stop", elem_id="stop-btn")
                ui["regenerate"] = gr.Button("Regenerate", elem_id="regenerate-btn")
                ui["clear"] = gr.Button("Clear", elem_id="clear-btn")
    return ui


def _wire(demo: gr.Blocks, ui: dict[str, Any], h: DemoHandlers, concurrency: int) -> None:
    conv, chatbot = ui["conv"], ui["chatbot"]
    ask: dict[str, Any] = {
        "fn": h.add_question,
        "inputs": [conv, ui["text"], ui["image"]],
        "outputs": [conv, chatbot, ui["text"], ui["image"]],
    }
    # All answers share one concurrency limit, whichever button started them.
    answer: dict[str, Any] = {
        "fn": h.answer,
        "inputs": [conv, ui["model"], ui["temperature"], ui["top_p"], ui["max_new_tokens"]],
        "outputs": [chatbot],
        "concurrency_id": "answer",
        "concurrency_limit": concurrency,
        "show_progress": "minimal",
    }
    answering = [
        ui["text"].submit(**ask).then(**answer),
        ui["send"].click(**ask).then(**answer),
        ui["regenerate"].click(h.regenerate, [conv], [conv, chatbot]).then(**answer),
    ]
    # Cancelling the answer's task closes its HTTP stream; the controller tells the worker.
    ui["stop"].click(None, None, None, cancels=answering)
    clear_outputs = [conv, chatbot, ui["text"], ui["image"]]
    ui["clear"].click(h.clear, None, clear_outputs, cancels=answering)
    chatbot.clear(h.clear, None, clear_outputs, cancels=answering)  # the chat's own trash button
    ui["refresh"].click(h.refresh_models, [ui["model"]], [ui["model"], ui["status"]])
    demo.load(h.load_models, [ui["model"]], [ui["model"], ui["status"]])
