"""Two checkpoints of the same model averaged, weight by weight ("model soup", Wortsman et al., 2022).

    python -m llava_serve.default_model.average A B OUT --weight 0.5

``OUT`` gets ``weight * A + (1 - weight) * B`` of every tensor, with A's config and processor. Both must
have the same architecture (a continuation and the checkpoint it started from, say): fine-tuned runs
from one parent usually sit in one basin, so the average keeps much of what each learnt
(docs/default_model.md, "Round 5").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def average_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """``weight * a + (1 - weight) * b`` per tensor, in float32; the same keys and shapes are required."""
    if not 0 <= weight <= 1:
        raise ValueError(f"--weight must be from 0 to 1, got {weight}")
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    out = {}
    for name, x in a.items():
        if x.shape != b[name].shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)} against {tuple(b[name].shape)}")
        out[name] = weight * x.float() + (1 - weight) * b[name].float()
    return out


def average(a: Path, b: Path, out: Path, weight: float) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from llava_serve.default_model.build import save_checkpoint

    first = LlavaForConditionalGeneration.from_pretrained(a, dtype=torch.float32).eval()
    second = LlavaForConditionalGeneration.from_pretrained(b, dtype=torch.float32).eval()
    first.load_state_dict(average_state(first.state_dict(), second.state_dict(), weight))
    save_checkpoint(first, LlavaProcessor.from_pretrained(a), out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--weight", type=float, default=0.5, help="of A (default 0.5)")
    args = parser.parse_args(argv)
    average(args.a, args.b, args.out, args.weight)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
