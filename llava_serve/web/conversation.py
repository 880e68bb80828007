"""One browser session's chat: its turns, what the model is sent, and what the page shows.

Failed exchanges stay on screen (the error is the answer) but are not sent to the model again;
an answer stopped half-way is kept as far as it got, as in LLaVA's demo.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from llava_serve.errors import ImageTooLarge

MAX_IMAGES = 8  # a worker's default --max-images


@dataclass
class Turn:
    role: Literal["user", "assistant"]
    text: str
    image_path: str | None = None  # user turns only: the uploaded file in Gradio's cache
    error: bool = False

    @property
    def answered(self) -> bool:
        """For an assistant turn: it holds (part of) a real answer."""
        return not self.error and bool(self.text)


@dataclass
class ModelRequest:
    """What the worker is asked: chat messages with image parts, and the images in order."""

    messages: list[dict[str, Any]]
    image_paths: list[str]


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    busy: bool = False  # an answer is being streamed into this conversation

    def add_question(self, text: str, image_path: str | None) -> None:
        self.turns.append(Turn("user", text, image_path))

    def awaiting_answer(self) -> bool:
        return bool(self.turns) and self.turns[-1].role == "user"

    def start_answer(self) -> Turn:
        turn = Turn("assistant", "")
        self.turns.append(turn)
        return turn

    def drop_last_answer(self) -> bool:
        """Remove the last answer so it can be generated again; False if there is none."""
        if self.turns and self.turns[-1].role == "assistant":
            self.turns.pop()
            return True
        return False

    def model_request(self, max_images: int = MAX_IMAGES) -> ModelRequest:
        """The answered exchanges, then the question now being answered (the last turn). Only the
        newest `max_images` pictures are sent (a worker takes 8 by default): older turns keep their
        text, so a long chat with many pictures goes on working."""
        kept: list[Turn] = []
        for i, turn in enumerate(self.turns):
            following = self.turns[i + 1] if i + 1 < len(self.turns) else None
            if turn.role == "assistant":
                if turn.answered:
                    kept.append(turn)
            elif following is None or following.answered:
                kept.append(turn)
        with_image = [t for t in kept if t.image_path]
        sent = {id(t) for t in with_image[len(with_image) - max_images :]} if max_images > 0 else set()
        messages = [_message(t, id(t) in sent) for t in kept]
        return ModelRequest(messages, [t.image_path for t in kept if id(t) in sent and t.image_path])

    def chatbot_messages(self) -> list[dict[str, Any]]:
        """The turns in gr.Chatbot's messages format (an answer not begun yet is not shown)."""
        shown: list[dict[str, Any]] = []
        for turn in self.turns:
            if turn.image_path:
                shown.append({"role": turn.role, "content": {"path": turn.image_path}})
            if turn.text:
                shown.append({"role": turn.role, "content": turn.text})
        return shown


def _message(turn: Turn, with_image: bool) -> dict[str, Any]:
    parts: list[dict[str, str]] = [{"type": "image"}] if turn.image_path and with_image else []
    parts.append({"type": "text", "text": turn.text})
    return {"role": turn.role, "content": parts}


def encode_image(path: str, max_side: int) -> str:
    """Base64 PNG of the image at `path`, in RGB, scaled down so its longer side is <= max_side."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale, far less memory
            rgb = img.convert("RGB")
    except Image.DecompressionBombError:
        raise ImageTooLarge("the image has too many pixels; upload a smaller one") from None
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
