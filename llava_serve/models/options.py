"""What to load and on which device: the options every loader takes, checked before anything loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava_serve.errors import ModelLoadError

if TYPE_CHECKING:  # torch loads when a device is resolved, not when flags are parsed
    import torch

# the batch engine's own integer weights (--quantization; engine/decoder_weights.py), beside
# bitsandbytes' --load-8bit / --load-4bit
QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True)
class LoadOptions:
    model_path: str
    model_base: str | None = None
    model_name: str | None = None
    device: str = "auto"
    dtype: str | None = None
    load_8bit: bool = False
    load_4bit: bool = False
    vision_tower: str | None = None
    conv_template: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.load_8bit and self.load_4bit:
            raise ModelLoadError("--load-8bit and --load-4bit are exclusive; pick one")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ModelLoadError(f"unknown --device {self.device!r}; use cpu, cuda, mps or auto")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_path.rstrip("/")).name


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    import torch

    if dtype:
        table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in table:
            raise ModelLoadError(f"unknown --dtype {dtype!r}; use one of {sorted(table)}")
        return table[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_float_dtype(path: Path) -> str | None:
    """The float dtype most of a checkpoint's weight bytes are stored in ("float32", "bfloat16",
    "float16"), read from its first safetensors file's header; None without one (or an unreadable one)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    sizes: dict[str, int] = {}
    try:
        with files[0].open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length < 100 << 20:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_FLOATS:
            start, end = entry.get("data_offsets", (0, 0))
            sizes[entry["dtype"]] = sizes.get(entry["dtype"], 0) + end - start
    return SAFETENSORS_FLOATS[max(sizes, key=lambda k: sizes[k])] if sizes else None


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path} has no config.json; point --model-path at a checkpoint folder")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg} is not valid JSON: {exc}") from None
