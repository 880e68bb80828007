"""Pretraining the vision tower from scratch: what each patch shows, supervised directly.

LLaVA starts from a pretrained CLIP tower. Here the tower starts from nothing, and learning to see
only through the language-model loss is far too slow for a CPU budget (the decoder fits the
language prior first; the image signal stays weak). So stage one trains the tower alone, with
three heads on its patch features (the features the projector reads):

- colour of the shape under each patch, or background (dense, easy);
- kind of each shape, from the mean feature of its patches (object level: an interior patch of a
  big square cannot tell it from a big circle, but the shape's patches together can);
- which patch holds each shape's centre (for counting and position);
- on every patch, how many shapes the picture holds, and how many of each kind and of each colour
  (``count_targets``): the number a count question asks for, readable from any image token, which
  the tower must work out by attending across the picture (the decoder alone learnt to count
  poorly: docs/default_model.md);
- a density map per patch (``density_targets``, as crowd counting does): each shape adds a small
  Gaussian bump of total mass one around its centre, in eleven channels (all shapes, each kind,
  each colour), so that a count is the sum of a local quantity over the image tokens: each patch
  says only how much of a shape's centre lies in it, and the heads' loss also asks the sums to be
  the counts.

The heads are used only in training and are not part of the saved checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from llava_serve.default_model.data import COLOURS, POSITIONS, SHAPES, Scene, draw_shape, position_of

N_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # 0 is background; then colour-major, kind-minor
MIN_COVER = 0.05  # a patch is labelled with a shape covering at least this fraction of it (small shapes too)


def class_of(colour: str, kind: str) -> int:
    return 1 + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(kind)


def _square_canvas(scene: Scene) -> tuple[int, int, int]:
    """Side of the padded square and the offsets of the image in it (as the image processor pads)."""
    side = max(scene.width, scene.height)
    return side, (side - scene.width) // 2, (side - scene.height) // 2


def patch_labels(scene: Scene, image_size: int, patch_size: int) -> torch.Tensor:
    """Per-patch class ids (row-major, like the tower's tokens) after pad-to-square and resize."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for shape in scene.shapes:
        draw_shape(draw, shape, scene.width, scene.height, class_of(shape.colour, shape.kind))
    side, dx, dy = _square_canvas(scene)
    square = Image.new("L", (side, side), 0)
    square.paste(mask, (dx, dy))
    pixels = np.asarray(square.resize((image_size, image_size), Image.NEAREST))
    grid = image_size // patch_size
    patches = pixels.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    labels = np.zeros(grid * grid, dtype=np.int64)
    for i, patch in enumerate(patches):
        counts = np.bincount(patch, minlength=N_CLASSES)
        counts[0] = 0
        if counts.max() >= MIN_COVER * patch.size:
            labels[i] = counts.argmax()
    return torch.from_numpy(labels)


def region_labels(scene: Scene, labels: torch.Tensor) -> torch.Tensor:
    """Per patch: 1 + index in POSITIONS of the position of the shape under it, or 0."""
    regions = torch.zeros_like(labels)
    for shape in scene.shapes:
        regions[labels == class_of(shape.colour, shape.kind)] = 1 + POSITIONS.index(position_of(shape))
    return regions


def centre_labels(scene: Scene, image_size: int, patch_size: int) -> torch.Tensor:
    """1 on the patch that holds each shape's centre."""
    side, dx, dy = _square_canvas(scene)
    grid = image_size // patch_size
    labels = torch.zeros(grid * grid)
    for shape in scene.shapes:
        col = min(grid - 1, int((dx + shape.cx * scene.width) / side * grid))
        row = min(grid - 1, int((dy + shape.cy * scene.height) / side * grid))
        labels[row * grid + col] = 1.0
    return labels


N_COUNTS = 1 + len(SHAPES) + len(COLOURS)  # the total, then per kind, then per colour
MAX_COUNT = 6


def count_targets(scene: Scene) -> torch.Tensor:
    """[shapes, per kind in SHAPES order, per colour in COLOURS order], each 0..MAX_COUNT."""
    kinds = [sum(s.kind == k for s in scene.shapes) for k in SHAPES]
    colours = [sum(s.colour == c for s in scene.shapes) for c in COLOURS]
    return torch.tensor([len(scene.shapes), *kinds, *colours]).clamp(max=MAX_COUNT)


DENSITY_SIGMA = 0.5  # of a patch: the spread of a shape's unit mass around its centre


def density_targets(scene: Scene, image_size: int, patch_size: int) -> torch.Tensor:
    """(patches, N_COUNTS): each shape's unit mass spread over the patches as a Gaussian around its centre
    (``DENSITY_SIGMA`` patches wide, folded back inside the picture), added to the total channel and to
    its kind's and its colour's (the channel order of ``count_targets``); every channel sums to its count."""
    side, dx, dy = _square_canvas(scene)
    grid = image_size // patch_size
    edges = torch.arange(grid + 1, dtype=torch.float64)
    out = torch.zeros(grid, grid, N_COUNTS, dtype=torch.float64)
    for shape in scene.shapes:
        col = (dx + shape.cx * scene.width) / side * grid
        row = (dy + shape.cy * scene.height) / side * grid
        mass = [torch.diff(torch.special.ndtr((edges - at) / DENSITY_SIGMA)) for at in (row, col)]
        bump = torch.outer(*(m / m.sum() for m in mass))
        for channel in (0, 1 + SHAPES.index(shape.kind), 1 + len(SHAPES) + list(COLOURS).index(shape.colour)):
            out[..., channel] += bump
    return out.reshape(grid * grid, N_COUNTS).float()


class VisionHeads(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.colour = torch.nn.Linear(hidden, 1 + len(COLOURS))
        self.kind = torch.nn.Linear(hidden, len(SHAPES))
        self.centre = torch.nn.Linear(hidden, 1)
        self.shape = torch.nn.Linear(hidden, N_CLASSES)
        self.region = torch.nn.Linear(hidden, 1 + len(POSITIONS))
        self.count = torch.nn.Linear(hidden, N_COUNTS * (MAX_COUNT + 1))
        self.density = torch.nn.Linear(hidden, N_COUNTS)

    def losses(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        regions: torch.Tensor,
        centres: torch.Tensor,
        counts: torch.Tensor | None = None,
        densities: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``features``: the tower's last hidden state (CLS first); ``counts``: count_targets per picture
        (None: no count loss); ``densities``: density_targets per picture (None: no density loss);
        returns losses and accuracies."""
        x = self.norm(features[:, 1:])
        colour_target = torch.where(labels > 0, (labels - 1) // len(SHAPES) + 1, 0)
        colour_logits = self.colour(x)
        one_hot = F.one_hot(labels, N_CLASSES)[..., 1:].to(x.dtype)  # batch, patch, shape class
        areas = one_hot.sum(1)
        present = areas > 0
        pooled = torch.einsum("bpc,bpd->bcd", one_hot, x) / areas.clamp(min=1).unsqueeze(-1)
        kind_target = (torch.arange(N_CLASSES - 1, device=x.device) % len(SHAPES)).expand_as(areas)[present]
        kind_logits = self.kind(pooled[present])
        centre_logits = self.centre(x).squeeze(-1)
        shape_logits = self.shape(x)
        region_logits = self.region(x)
        out = {
            "shape": F.cross_entropy(shape_logits.flatten(0, 1), labels.flatten()),
            "region": F.cross_entropy(region_logits.flatten(0, 1), regions.flatten()),
            "colour": F.cross_entropy(colour_logits.flatten(0, 1), colour_target.flatten()),
            "kind": F.cross_entropy(kind_logits, kind_target),
            "centre": F.binary_cross_entropy_with_logits(centre_logits, centres),
            "colour_acc": (colour_logits.argmax(-1) == colour_target)[labels > 0].float().mean().detach(),
            "kind_acc": (kind_logits.argmax(-1) == kind_target).float().mean().detach(),
            "shape_acc": (shape_logits.argmax(-1) == labels)[labels > 0].float().mean().detach(),
            "region_acc": (region_logits.argmax(-1) == regions)[labels > 0].float().mean().detach(),
            "centre_acc": ((centre_logits > 0) == (centres > 0.5)).all(-1).float().mean().detach(),
        }
        if counts is not None:  # every patch predicts every count of its picture
            logits = self.count(x).unflatten(-1, (N_COUNTS, MAX_COUNT + 1))  # batch, patch, count, value
            target = counts.unsqueeze(1).expand(-1, logits.shape[1], -1)
            out["count"] = F.cross_entropy(logits.flatten(0, 2), target.flatten())
            out["count_acc"] = (logits[:, :, 0].mean(1).argmax(-1) == counts[:, 0]).float().mean().detach()
        if densities is not None:  # per patch and channel, and their sums: the counts
            predicted = F.relu(self.density(x).float())  # exactly 0 on the background: 81 small errors add up
            sums, wanted = predicted.sum(1), densities.sum(1)
            out["density"] = 10 * F.mse_loss(predicted, densities) + F.smooth_l1_loss(sums, wanted)
            out["density_acc"] = (sums[:, 0].round() == wanted[:, 0].round()).float().mean().detach()
        return out


class FeatureTap:
    """Keeps the output of the vision tower's last encoder layer (what the projector reads)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.features: torch.Tensor | None = None
        layer = model.model.vision_tower.encoder.layers[-1]
        self.handle = layer.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output[0] if isinstance(output, tuple) else output

    def close(self) -> None:
        self.handle.remove()
