"""Where each session checkpoint lives and how to load it; chat message shorthand."""

from __future__ import annotations

from pathlib import Path

from llava_serve.models.options import LoadOptions

# kind -> (model_path, model_base) relative to the kind's build folder
LAYOUTS = {
    "original": (".", None),
    "original-projector": ("projector", "base"),
    "original-lora": ("lora", "base"),
    "anyres": (".", None),
}


def options_for(root: Path, kind: str, **kw) -> LoadOptions:
    path, base = LAYOUTS[kind]
    kw.setdefault("conv_template", "llava_v1")
    return LoadOptions(
        model_path=str(root / kind / path), model_base=str(root / kind / base) if base else None, device="cpu", **kw
    )


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}
