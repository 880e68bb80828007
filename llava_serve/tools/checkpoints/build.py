"""`llava-serve build-model --kind llava --size tiny --out DIR`: a random-weight checkpoint folder that
loads with plain transformers (and, for the `original*` kinds, in the original LLaVA layout)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

SIZES = ("1b", "bench", "small", "tiny")  # checked against hf.SIZES by a test; here so that --help needs no torch


def build(
    kind: str, size_name: str, out: Path, seed: int = 0, image_size: int | None = None, patch_size: int | None = None
) -> Path:
    """`image_size`/`patch_size` override the size's vision geometry (e.g. 336 and 14: LLaVA-1.5's
    576 image tokens per image on the bench decoder)."""
    import dataclasses

    from llava_serve.tools.checkpoints.hf import SIZES as BY_NAME
    from llava_serve.tools.checkpoints.hf import build_hf, build_internvl
    from llava_serve.tools.checkpoints.original import build_original

    size = BY_NAME[size_name]
    size = dataclasses.replace(size, image_size=image_size or size.image_size, patch_size=patch_size or size.patch_size)
    if size.image_size % size.patch_size:
        raise ValueError(f"image size {size.image_size} is not a multiple of patch size {size.patch_size}")
    out.mkdir(parents=True, exist_ok=True)
    if kind in ("llava", "llava-next", "text"):
        build_hf(kind, size, out, seed)
    elif kind == "internvl":
        build_internvl(size, out, seed)
    else:
        build_original(kind, size, out, seed)
    return out


KINDS = ["llava", "llava-next", "internvl", "text", "original", "original-projector", "original-lora"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-serve build-model", description=__doc__)
    parser.add_argument("--kind", choices=KINDS, default="llava")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="vision input in pixels (default: the size's)")
    parser.add_argument("--patch-size", type=int, default=None, help="vision patch in pixels (default: the size's)")
    args = parser.parse_args(argv)
    for name in ("image_size", "patch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        path = build(args.kind, args.size, args.out, args.seed, args.image_size, args.patch_size)
    except ValueError as exc:
        parser.error(str(exc))
    n_params = _count_params(path)
    print(f"wrote {args.kind}/{args.size} checkpoint to {path} ({n_params / 1e6:.1f}M parameters)")
    return 0


def _count_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                total += math.prod(f.get_slice(key).get_shape())  # get_shape() is a list
    return total
