"""A checkpoint's vision tower converted to another input size and patch size.

    python -m llava_serve.default_model.resize SRC DST --image-size 144 --patch-size 24   # same 6x6 grid
    python -m llava_serve.default_model.resize SRC DST --image-size 216 --patch-size 24   # a 9x9 grid

FlexiViT's PI-resize (Beyer et al., 2023): the patch-embedding kernel (a conv with kernel = stride =
patch size) is resized from p x p to q x q so that a patch upsampled by q / p gives the same
embedding as the original patch: with ``B`` the (q*q, p*p) matrix of the bilinear upsampling,
the new kernel is ``pinv(B.T) @ w``, the least-norm ``w'`` with ``B.T @ w' = w`` (exact for
upsampling, since B has full column rank). On the same grid (``image_size / patch_size`` patches a
side) the position embeddings are kept as they are and the decoder gets the same number of image
tokens. On another grid they are resampled bicubically, as ViTs are fine-tuned at a higher
resolution (what transformers' ``interpolate_pos_encoding`` computes at every call, done once), and
the decoder gets grid x grid image tokens: a model converted so needs training to read them. The
model config (vision ``image_size`` and ``patch_size``, ``image_seq_length``), the image processor
(``size`` and ``crop_size``) and the processor's ``patch_size`` are updated, so the folder loads with
plain transformers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F


def resize_matrix(old: int, new: int) -> torch.Tensor:
    """(new*new, old*old): column j is the bilinear resize of the j-th one-hot old x old patch."""
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(new, new), mode="bilinear", align_corners=False, antialias=new < old)
    return resized.reshape(old * old, new * new).T


def pi_resize_kernel(kernel: torch.Tensor, new: int) -> torch.Tensor:
    """(out, in, p, p) -> (out, in, new, new) with <resize(x), k'> = <x, k> for every p x p patch x."""
    out_ch, in_ch, old, old_w = kernel.shape
    if old != old_w:
        raise ValueError(f"square kernels only, got {old}x{old_w}")
    if new == old:
        return kernel.clone()
    pinv = torch.linalg.pinv(resize_matrix(old, new).T)  # (new*new, old*old)
    flat = kernel.to(torch.float64).reshape(out_ch * in_ch, old * old)
    return (flat @ pinv.T).reshape(out_ch, in_ch, new, new).to(kernel.dtype)


def resample_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, d) position embeddings (CLS first) -> (1 + grid*grid, d): the patches' bicubically."""
    old = round((table.shape[0] - 1) ** 0.5)
    if old * old != table.shape[0] - 1:
        raise ValueError(f"{table.shape[0] - 1} patch positions are not a square grid")
    patches = table[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).to(torch.float64)
    resized = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)])


def resize_model(model, image_size: int, patch_size: int) -> None:
    """In place: a ``LlavaForConditionalGeneration``'s CLIP tower made to read ``image_size`` px in
    ``patch_size`` px patches (position embeddings resampled if the grid changes)."""
    vision = model.config.vision_config
    if image_size % patch_size:
        raise ValueError(f"{image_size} px is not a whole number of {patch_size} px patches")
    embeddings = model.model.vision_tower.embeddings
    grid = image_size // patch_size
    if grid != vision.image_size // vision.patch_size:
        table = embeddings.position_embedding.weight.detach()
        positions = torch.nn.Embedding(1 + grid * grid, table.shape[1]).to(device=table.device, dtype=table.dtype)
        with torch.no_grad():
            positions.weight.copy_(resample_positions(table, grid))
        embeddings.position_embedding = positions
        embeddings.num_patches = grid * grid
        embeddings.num_positions = 1 + grid * grid
        embeddings.position_ids = torch.arange(1 + grid * grid, device=table.device).expand((1, -1))
        model.config.image_seq_length = grid * grid
    conv = embeddings.patch_embedding
    new_conv = torch.nn.Conv2d(
        conv.in_channels, conv.out_channels, patch_size, stride=patch_size, bias=conv.bias is not None
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new_conv.weight.copy_(pi_resize_kernel(conv.weight.detach(), patch_size))
        if conv.bias is not None and new_conv.bias is not None:
            new_conv.bias.copy_(conv.bias)
    embeddings.patch_embedding = new_conv
    embeddings.image_size = image_size
    embeddings.patch_size = patch_size
    vision.image_size = image_size
    vision.patch_size = patch_size


def grow_tower(model, extra: int) -> None:
    """In place: ``extra`` encoder layers appended to a ``LlavaForConditionalGeneration``'s CLIP tower,
    each a copy of its last layer with the attention's and the MLP's output projections zeroed, so
    that it starts as the identity (both sit on the residual stream) and the model answers exactly
    as before; training then gives the tower more depth (config ``num_hidden_layers`` updated)."""
    import copy

    if extra < 0:
        raise ValueError(f"cannot remove layers ({extra})")
    layers = model.model.vision_tower.encoder.layers
    for _ in range(extra):
        layer = copy.deepcopy(layers[-1])
        with torch.no_grad():
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
        layers.append(layer)
    model.config.vision_config.num_hidden_layers = len(layers)


def resize_processor(processor, image_size: int, patch_size: int) -> None:
    """In place: the ``LlavaProcessor``'s image processor resizes to ``image_size``; ``patch_size`` updated."""
    ip = processor.image_processor
    ip.size = {"height": image_size, "width": image_size}
    ip.crop_size = {"height": image_size, "width": image_size}
    processor.patch_size = patch_size


def convert(src: Path, dst: Path, image_size: int, patch_size: int) -> None:
    """Load the checkpoint at ``src``, resize its tower and processor, save to ``dst`` (float16 weights, as shipped)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from llava_serve.default_model.build import save_checkpoint

    processor = LlavaProcessor.from_pretrained(src)
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    resize_model(model, image_size, patch_size)
    resize_processor(processor, image_size, patch_size)
    save_checkpoint(model, processor, dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--patch-size", type=int, required=True)
    args = parser.parse_args(argv)
    convert(args.src, args.dst, args.image_size, args.patch_size)
    print(f"saved to {args.dst}")


if __name__ == "__main__":
    main()
