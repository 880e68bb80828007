"""Train the default model on synthetic shapes, on a CPU.

    llava-serve train-default --out DIR            # from scratch: stages one and two
    llava-serve train-default --init-from DIR --out DIR2 --vision-steps 300 --vision-batch-size 48 \
        --vision-lr 1e-3 --steps 2200 --lr 1e-3 --warmup 50   # a continuation (docs/default_model.md)
    llava-serve train-default --init-from DIR --image-size 144 --patch-size 24 --out DIR2 ...

Stage one: LLaVA starts from a pretrained CLIP tower; this one starts from nothing, so the vision
tower is pretrained alone to say what each patch shows (``--vision-steps``, see vision_aux).
Stage two trains the projector and decoder on the dialogues (``--steps``), with loss only on the
assistant's answers; the tower keeps training on its stage-one losses (``--aux-weight``; 0 freezes
it, as LLaVA does). ``--init-from`` continues from a checkpoint (with ``--vision-steps`` > 0 the
tower gets fresh heads and a vision stage first): the shipped model is a chain of such continuations
from a model first trained on easier pictures (docs/default_model.md). ``--image-size`` and
``--patch-size`` other than the checkpoint's convert its tower first (resize.py: FlexiViT's
PI-resize of the patch kernel; on another patch grid the position embeddings are resampled and the
decoder gets that many more or fewer image tokens), and training draws its pictures at that size.
Reproducible for a given seed, thread count and torch build. Writes a complete checkpoint folder
(weights, config, tokenizer, processor, chat template) that loads with plain transformers;
``--save-every N`` also writes OUT-stepN folders along the way. ``--easy-steps N`` draws the vision
stage's first N steps' pictures plain, fewer as they go (a curriculum); ``--count-weight W`` adds
count targets to the tower's heads (vision_aux.count_targets). Both are off by default: neither
helped in the runs of docs/default_model.md ("Round 4"). ``--density-weight W`` adds per-patch
count densities (vision_aux.density_targets: each shape a bump of mass one around its centre, the
patches' sums the counts), its loss weighted W, in both stages (off by default).
``--text-only F`` sets the share of dialogues with no picture (default 0.05); ``--varied-greetings
P`` rewords each of their questions with chance P (a greeting before another question, lower case,
other punctuation; default 0: training's own list).
``--same-scenes P``: the share of the dialogue stage's pictures of two or more shapes that are all one
kind and colour ("three blue circles"; default 0.1, as always).
``--grow-tower N`` (with ``--init-from``) appends N encoder layers to the checkpoint's tower, each
starting as the identity (resize.grow_tower; default 0).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from llava_serve.default_model import default_model_path
from llava_serve.default_model.questions import KINDS

DESCRIPTION = __doc__


@dataclass(frozen=True)
class TrainConfig:
    vision_steps: int = 2000
    steps: int = 3000
    vision_batch_size: int = 64
    batch_size: int = 32
    vision_lr: float = 2e-3
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    aux_weight: float = 0.5  # > 0: the tower keeps training in stage two, with its stage-one losses
    easy_steps: int = 0  # a curriculum: plain pictures over the first N vision steps, fewer as they go
    count_weight: float = 0.0  # > 0: the tower's heads also learn every count of the picture, on each patch
    density_weight: float = 0.0  # > 0: ... and per-patch count densities that sum to the counts (vision_aux)
    init_from: Path | None = None  # continue from this checkpoint (then usually --vision-steps 0)
    grow_tower: int = 0  # > 0 (with --init-from): N more tower layers, starting as the identity (resize.grow_tower)
    image_size: int = 0  # the tower's input in px; 0: the checkpoint's (from scratch: build.ModelSize's, 96)
    patch_size: int = 0  # its patch in px; 0 likewise (16). Other than --init-from's: converted (resize.py)
    text_only: float = 0.05  # the share of dialogues with no picture (batches.TEXT_ONLY)
    varied_greetings: float = 0.0  # > 0: the chance a no-picture question is reworded (questions.varied_text_question)
    same_scenes: float = 0.1  # of the dialogues' pictures of 2+ shapes, all one kind and colour (data.SAME_SHARE)
    question_weights: str = ""  # e.g. "colour=3,shape=1": how often each kind is asked (default KIND_WEIGHTS)
    save_every: int = 0  # > 0: also save the model every N dialogue steps, to OUT-stepN (for evaluation)
    seed: int = 0
    precision: str = "bf16"  # of the matmuls (autocast); "fp32" for full precision throughout
    threads: int = 1  # more only on an idle machine: on shared cores, torch threads wait for each other
    device: str = "cpu"
    out: Path = default_model_path()  # noqa: RUF009 (a fixed path, computed once)

    def __post_init__(self) -> None:
        parse_weights(self.question_weights)  # a bad spec fails now, not after the vision stage
        if not all(0 <= share <= 1 for share in (self.text_only, self.varied_greetings, self.same_scenes)):
            raise ValueError("--text-only, --varied-greetings and --same-scenes are shares, from 0 to 1")
        if self.grow_tower < 0 or (self.grow_tower and self.init_from is None):
            raise ValueError("--grow-tower N: N >= 0, and only with --init-from (a tower to grow)")
        if self.easy_steps < 0 or self.count_weight < 0 or self.density_weight < 0:
            raise ValueError("--easy-steps, --count-weight and --density-weight must not be negative")
        if self.steps < 1 or self.vision_steps < 0 or self.batch_size < 1 or self.vision_batch_size < 1:
            raise ValueError("steps and batch sizes must be positive, vision_steps not negative")
        if (self.image_size > 0) != (self.patch_size > 0) or self.image_size < 0 or self.patch_size < 0:
            raise ValueError("--image-size and --patch-size go together (both positive, or both 0)")
        if self.image_size and self.image_size % self.patch_size:
            raise ValueError("--image-size must be a multiple of --patch-size")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision: {self.precision!r}; one of bf16, fp32")


def parse_weights(text: str) -> dict[str, float] | None:
    """ "colour=3,shape=1" -> {"colour": 3.0, "shape": 1.0, other kinds: 1.0}; "" -> None (the defaults)."""
    if not text:
        return None
    weights = dict.fromkeys(KINDS, 1.0)
    for part in text.split(","):
        kind, _, value = part.partition("=")
        if kind.strip() not in weights:
            raise ValueError(f"--question-weights: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        try:
            weights[kind.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--question-weights: {part!r} is not KIND=NUMBER") from None
    return weights


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="llava-serve train-default", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = Path if f.name in ("out", "init_from") else type(getattr(defaults, f.name))
        parser.add_argument(flag, type=kind, default=getattr(defaults, f.name))
    return TrainConfig(**vars(parser.parse_args(argv)))
