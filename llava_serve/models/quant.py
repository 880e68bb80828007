"""bitsandbytes quantization of the language model; vision tower and projector stay full precision."""

from __future__ import annotations

import logging
from typing import Any

import torch

from llava_serve.errors import ModelLoadError

# modules kept in full precision (names as in transformers' Llava classes). transformers 5 matches
# these as regexes anchored at the start of the module path (or as a suffix), so a bare
# "vision_tower" would miss "model.vision_tower.…": allow any parent path in front.
_FULL_PRECISION = ["vision_tower", "multi_modal_projector", "lm_head", "image_newline", "vision_model", "mlp1"]
SKIP_MODULES = [rf"(?:.*\.)?{name}" for name in _FULL_PRECISION]
# On a CPU with AVX-512 BF16, importing bitsandbytes tries to fetch a faster 4-bit kernel from the
# Hugging Face Hub through the optional `kernels` package and warns "pip install kernels" when it
# cannot: bitsandbytes' own CPU kernel is used then, which is what a server without the Hub wants.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"
logger = logging.getLogger(__name__)


class _KernelsHintFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_KERNELS_HINT):
            logger.debug("bitsandbytes uses its built-in CPU 4-bit kernel (%s)", record.getMessage())
            return False
        return True


def quiet_kernels_hint() -> None:
    """Drop bitsandbytes' "pip install kernels" warning (once per process; idempotent)."""
    bnb_logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _KernelsHintFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_KernelsHintFilter())


def quantization_config(load_8bit: bool, load_4bit: bool, device: torch.device, dtype: torch.dtype) -> Any:
    if not (load_8bit or load_4bit):
        return None
    if device.type == "mps":
        raise ModelLoadError(
            "bitsandbytes quantization does not run on MPS; drop --load-8bit/--load-4bit or use --device cpu"
        )
    quiet_kernels_hint()
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


@torch.no_grad()
def detach_from_checkpoint(model: torch.nn.Module) -> None:
    """Copy the full-precision tensors of a quantized model out of the memory-mapped checkpoint.

    transformers loads safetensors through mmap; a float tensor kept as-is (vision tower, projector,
    embeddings) keeps the whole file mapped, and every page read while quantizing stays in RSS. On
    a 170M-parameter model that is ~600 MiB of RSS for weights the model no longer uses.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.dtype.is_floating_point:
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.dtype.is_floating_point:
                module._buffers[name] = buffer.clone()
