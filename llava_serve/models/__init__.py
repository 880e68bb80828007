"""Model loading: HF checkpoints, original LLaVA format, quantization, prompt templates, images."""

from llava_serve.models.base import EncodedPrompt, LoadedModel, PreparedImage
from llava_serve.models.loader import LoadOptions, load_model

__all__ = ["EncodedPrompt", "LoadOptions", "LoadedModel", "PreparedImage", "load_model"]
