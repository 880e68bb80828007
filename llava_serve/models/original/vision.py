"""The vision side of an original LLaVA checkpoint: finding the CLIP folder, its weights, image prep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava_serve.errors import ModelLoadError
from llava_serve.models.options import LoadOptions
from llava_serve.models.original.configs import is_anyres, pinpoints
from llava_serve.models.original.weights import read_weights


def resolve_vision_tower(name: str, path: Path, options: LoadOptions) -> Path:
    """A local folder for `mm_vision_tower`; nothing is downloaded."""
    base = Path(name).name
    if options.vision_tower:
        root = Path(options.vision_tower).expanduser()
        candidates = [root, root / name, root / base]
    elif Path(name).expanduser().is_absolute():
        candidates = [Path(name).expanduser()]
    else:
        roots = [path] + ([Path(options.model_base).expanduser()] if options.model_base else [])
        candidates = [c for r in roots for c in (r / name, r / base, r.parent / base)]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    cached = None if options.vision_tower else _hub_cache(name)
    if cached is not None:
        return cached
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    flag = (
        f"--vision-tower {options.vision_tower}" if options.vision_tower else f"mm_vision_tower in {path}/config.json"
    )
    raise ModelLoadError(
        f"vision tower {name!r} ({flag}) not found locally; looked in {looked}. Download it (for example "
        f"`huggingface-cli download {name} --local-dir DIR`) and pass --vision-tower DIR, or put a folder named "
        f"{base!r} next to the checkpoint"
    )


def _hub_cache(name: str) -> Path | None:
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        found = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, no hub library, bad repo id: all mean "not here"
        return None
    return found if (found / "config.json").is_file() else None


def vision_tower_config(tower: Path) -> Any:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(tower)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"vision tower {tower}: transformers cannot read its config ({exc})") from None
    vision = getattr(cfg, "vision_config", None) or cfg
    if not getattr(vision, "model_type", "").endswith("vision_model"):
        raise ModelLoadError(f"vision tower {tower} is a {cfg.model_type!r} model, not a CLIP-style vision encoder")
    return vision


def vision_state(tower: Path, overrides: dict[str, torch.Tensor], expected: set[str]) -> dict:
    """Tower weights under the runtime names of the vision model (with or without `vision_model.`)."""
    out: dict[str, torch.Tensor] = {}
    for source in (read_weights(tower), overrides):
        for key, tensor in source.items():
            name = next((c for c in (key, key.removeprefix("vision_model.")) if c in expected), None)
            if name is not None:
                out[name] = tensor
    missing = expected - out.keys()
    if missing:
        raise ModelLoadError(f"vision tower {tower} lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    return out


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's 'pad': centre the image on a square of the processor's mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@dataclass
class ImagePrep:
    """Pixel tensors and the image-token count for one image, per LLaVA's image_aspect_ratio."""

    processor: Any
    aspect: str
    tokens_per_tile: int
    grid: Any = None  # (pinpoints, tile size, patch size) for anyres

    def __call__(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        image = image.convert("RGB")
        if self.aspect == "anyres":
            out = self.processor(image, return_tensors="pt")
            inputs = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
            return inputs, anyres_token_count(image.height, image.width, *self.grid)
        if self.aspect == "pad":
            image = expand2square(image, tuple(int(x * 255) for x in self.processor.image_mean))
        return {"pixel_values": self.processor(image, return_tensors="pt")["pixel_values"]}, self.tokens_per_tile


def anyres_token_count(height: int, width: int, pinpoints: list, tile: int, patch: int) -> int:
    """Tokens LlavaNext produces for one image: the base tile plus the unpadded grid with newlines."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = tile // patch
    rows, cols = get_anyres_image_grid_shape((height, width), pinpoints, tile)
    grid = unpad_image(torch.empty(0, rows * side, cols * side), (height, width))
    return side * side + grid.shape[1] * (grid.shape[2] + 1)


def image_prep(tower: Path, config: dict, vision_cfg: Any, select_full: bool) -> ImagePrep:
    from transformers import AutoImageProcessor, LlavaNextImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(tower)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"vision tower {tower} has no usable preprocessor_config.json ({exc})") from None
    aspect = "anyres" if is_anyres(config) else config.get("image_aspect_ratio") or "square"
    per_tile = (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + int(select_full)
    if aspect != "anyres":
        return ImagePrep(processor, "pad" if aspect == "pad" else "square", per_tile)
    points = pinpoints(config)
    tiled = LlavaNextImageProcessor.from_dict({**processor.to_dict(), "image_grid_pinpoints": points})
    return ImagePrep(tiled, "anyres", per_tile, (points, vision_cfg.image_size, vision_cfg.patch_size))
