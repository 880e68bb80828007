"""bitsandbytes quantization of the language model; vision tower and projector stay full precision."""

from __future__ import annotations

from typing import Any

import torch

from llava_serve.errors import ModelLoadError

# modules kept in full precision (names as in transformers' Llava classes)
SKIP_MODULES = ["vision_tower", "multi_modal_projector", "lm_head", "image_newline", "vision_model", "mlp1"]


def quantization_config(load_8bit: bool, load_4bit: bool, device: torch.device, dtype: torch.dtype) -> Any:
    if not (load_8bit or load_4bit):
        return None
    if device.type == "mps":
        raise ModelLoadError(
            "bitsandbytes quantization does not run on MPS; drop --load-8bit/--load-4bit or use --device cpu"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelLoadError(
            "--load-8bit/--load-4bit need bitsandbytes: pip install 'llava-serve[quant]' (or bitsandbytes)"
        ) from None
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=SKIP_MODULES,
    )
