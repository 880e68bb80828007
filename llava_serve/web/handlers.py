"""What each button of the demo does. State lives in the per-session `Conversation`; the
model list cache lives on this object (one per app), never in a module global."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from llava_serve.cluster.client import ClusterClient
from llava_serve.errors import ControllerUnavailable, Forbidden, Overloaded, ServeError, Unauthorized
from llava_serve.web.chat import SamplingParams, stream_answer
from llava_serve.web.config import WebConfig
from llava_serve.web.conversation import Conversation, Turn
from llava_serve.web.uploads import is_upload

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


def format_error(err: ServeError) -> str:
    """How an error reads in the chat: the message, its FastChat error code and what to do, no traceback."""
    return f"Error: {err.message} (error code {int(err.code)}){_hint(err)}"


def _hint(err: ServeError) -> str:
    if isinstance(err, Overloaded):
        return f"; the model is busy, try again in {err.retry_after:g} s"
    if isinstance(err, (Unauthorized, Forbidden)):
        return "; check the web demo's --controller-api-key"
    if isinstance(err, ControllerUnavailable):
        return "; is the controller running?"
    return ""


class DemoHandlers:
    def __init__(self, config: WebConfig, client: ClusterClient) -> None:
        self.config = config
        self.client = client
        self._models: list[str] | None = None  # kept between page loads in "once" mode

    async def load_models(self, current: str | None) -> tuple[Any, str]:
        if self.config.model_list_mode == "once" and self._models is not None:
            return _model_picker(self._models, current), _models_note(self._models)
        return await self.refresh_models(current)

    async def refresh_models(self, current: str | None) -> tuple[Any, str]:
        try:
            models = await self.client.list_models()
        except ServeError as err:
            logger.warning("cannot list models: %s", err.message)
            return gr.Dropdown(), f"**Could not load the model list:** {err.message}"
        self._models = models or None  # an empty list is asked again on the next page load
        return _model_picker(models, current), _models_note(models)

    def add_question(
        self, conv: Conversation, text: str, image_path: str | None
    ) -> tuple[Conversation, Messages, Any, Any]:
        if conv.busy:
            gr.Warning("An answer is still being written: wait for it or press Stop.")
            return conv, conv.chatbot_messages(), gr.Textbox(), gr.Image()
        if image_path and not is_upload(image_path):  # Gradio checks this too; fail closed if it stops
            gr.Warning("That image was not uploaded here.")
            return conv, conv.chatbot_messages(), gr.Textbox(), None
        if not (text or "").strip():
            gr.Warning("Type a question first.")
            return conv, conv.chatbot_messages(), gr.Textbox(), gr.Image()
        conv.add_question(text.strip(), image_path)
        return conv, conv.chatbot_messages(), "", None

    def regenerate(self, conv: Conversation) -> tuple[Conversation, Messages]:
        if conv.busy:
            gr.Warning("An answer is still being written: wait for it or press Stop.")
        elif not conv.drop_last_answer():
            gr.Warning("There is no answer to regenerate yet.")
        return conv, conv.chatbot_messages()

    def clear(self) -> tuple[Conversation, Messages, str, None]:
        return Conversation(), [], "", None

    async def answer(
        self, conv: Conversation, model: str | None, temperature: float, top_p: float, max_new_tokens: float
    ) -> AsyncIterator[Messages]:
        """Stream the answer to the last question into the chat; errors become the answer's text."""
        if conv.busy or not conv.awaiting_answer():
            return
        request = conv.model_request()
        turn = conv.start_answer()
        conv.busy = True
        params = SamplingParams(temperature, top_p, int(max_new_tokens))
        try:
            async for text in stream_answer(self.client, model, request, params, self.config.max_image_side):
                turn.text = text  # set right before the yield, so a stop keeps what was shown
                yield conv.chatbot_messages()
            if not turn.text:
                turn.text, turn.error = "(the model gave an empty answer)", True
                yield conv.chatbot_messages()
        except ServeError as err:
            _fail(turn, format_error(err))
            yield conv.chatbot_messages()
        except Exception as exc:  # a bug here must still read as text in the chat, and be logged
            logger.exception("answer failed")
            _fail(turn, f"Error: the web demo failed: {type(exc).__name__}: {exc}")
            yield conv.chatbot_messages()
        finally:
            conv.busy = False


def _fail(turn: Turn, error: str) -> None:
    """Show the error after whatever part of the answer had arrived; the exchange is not resent."""
    turn.text = f"{turn.text}\n\n{error}" if turn.text else error
    turn.error = True


def _model_picker(models: list[str], current: str | None) -> Any:
    value = current if current in models else (models[0] if models else None)
    return gr.Dropdown(choices=models, value=value)


def _models_note(models: list[str]) -> str:
    if not models:
        return "**No model is available:** no worker is registered with the controller. Refresh once one is."
    return ""
