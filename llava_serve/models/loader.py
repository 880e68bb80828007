"""Entry point for loading: pick the loader from the checkpoint's config, never from its name."""

from __future__ import annotations

from pathlib import Path

from llava_serve.errors import ModelLoadError
from llava_serve.models.base import LoadedModel
from llava_serve.models.hf import load_hf
from llava_serve.models.options import LoadOptions, read_config, resolve_device, resolve_dtype
from llava_serve.models.original import load_original

__all__ = ["LoadOptions", "is_original_llava", "load_model"]

ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM"}


def is_original_llava(config: dict) -> bool:
    archs = set(config.get("architectures") or [])
    return bool(archs & ORIGINAL_ARCHITECTURES) or "mm_vision_tower" in config or "mm_projector_type" in config


def load_model(options: LoadOptions) -> LoadedModel:
    """Load any supported checkpoint from a local folder."""
    path = Path(options.model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--model-path {options.model_path}: no such folder")
    config = read_config(path)
    device = resolve_device(options.device)
    dtype = resolve_dtype(device, options.dtype)
    if is_original_llava(config) or options.model_base:
        return load_original(options, path, config, device, dtype)
    return load_hf(options, path, config, device, dtype)
