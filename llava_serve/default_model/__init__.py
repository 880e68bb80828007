"""The small LLaVA that ships with llava-serve, trained from scratch on synthetic shapes.

Only ``default_model_path`` is imported here, so that finding the checkpoint costs nothing; the
training and evaluation code lives in submodules (``train``, ``eval``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path"]


def default_model_path() -> Path:
    """The folder of the shipped checkpoint (loads with ``LlavaForConditionalGeneration.from_pretrained``)."""
    return Path(__file__).resolve().parent / "llava-shapes"
