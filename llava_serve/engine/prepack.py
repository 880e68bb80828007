"""CPU float32 linear layers with their weights prepacked by oneDNN, for batched decode steps.

A decode step multiplies a few rows (one per running request) by every weight matrix. PyTorch's
``F.linear`` repacks the weight into the GEMM kernel's blocked layout on every call, which at 4 to
32 rows costs about as much as the multiplication itself. oneDNN can pack a weight once
(``mkldnn._reorder_linear_weight``) and multiply any number of rows by the packed copy: on a 2-core
Sapphire Rapids a 1024x2816 layer went from 77 to 203 GFLOP/s at 16 rows, 108 to 260 at 32.

At one row the packed kernel is slower than ``F.linear`` (20 vs 24 GFLOP/s), so ``PackedLinear``
keeps the original weight too and uses it for single-row calls (a lone request decodes exactly
as before). The cost is memory: a second copy of every swapped weight.
Results are not bitwise equal to ``F.linear`` (another summation order; differences ~1e-5 relative).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def prepack_available(model: torch.nn.Module) -> bool:
    """oneDNN is built in, and the model is on the CPU in float32."""
    param = next(model.parameters(), None)
    return (
        param is not None
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


class PackedLinear(torch.nn.Module):
    """A drop-in for ``nn.Linear`` (same ``weight`` and ``bias`` parameters, plus the packed copy)."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= 1 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def prepack_linears(model: torch.nn.Module, rows_hint: int) -> int:
    """Swap every plain float32 ``nn.Linear`` of ``model`` (in place) for a ``PackedLinear``.

    Subclasses (bitsandbytes' quantized layers, LoRA wrappers) are left alone. Returns how many
    layers were swapped; 0 where prepacking is not available. Idempotent.
    """
    if not prepack_available(model):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child, rows_hint))
                swapped += 1
    if swapped:
        log.info("prepacked %d linear layers for batched CPU decoding", swapped)
    return swapped
