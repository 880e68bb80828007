"""The held-out split: its own renderer, never used by training; the fixed cases of issue 15."""

from __future__ import annotations

import ast
import random
from pathlib import Path
from unittest import mock

import torch

import llava_serve.default_model as default_model
from llava_serve.default_model import heldout
from llava_serve.default_model.batches import (
    TEXT_ONLY,
    Example,
    collate,
    conversation,
    examples,
    image_batches,
    pixel_values,
    sample_example,
)
from llava_serve.default_model.build import ModelSize, build_processor
from llava_serve.default_model.eval import eval_items, points_to_pictures
from llava_serve.default_model.heldout import HELDOUT_SEED, regression_cases, render_heldout, sample_heldout_scene
from llava_serve.default_model.questions import text_only_qa
from llava_serve.default_model.tokenizer import build_tokenizer

TRAINING_MODULES = ("data", "questions", "batches", "train", "train_cli", "train_config", "tokenizer", "vision_aux",
                    "build", "scoring")  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_no_training_module_imports_the_heldout_renderer() -> None:
    root = Path(default_model.__file__).parent
    for name in TRAINING_MODULES:
        assert not any("heldout" in m for m in imported_modules(root / f"{name}.py")), name


def test_training_streams_never_call_the_heldout_renderer() -> None:
    processor = build_processor(ModelSize(), build_tokenizer())
    boom = mock.Mock(side_effect=AssertionError("training drew a held-out picture"))
    with mock.patch.object(heldout, "render_heldout", boom), mock.patch.object(heldout, "sample_heldout_scene", boom):
        stream = examples(0)
        collate([next(stream) for _ in range(16)], processor)
        next(image_batches(1, processor, ModelSize(), 4))
    boom.assert_not_called()


def test_text_only_share_of_the_training_stream() -> None:
    def first(n: int, **kw) -> list:
        stream = examples(3, **kw)
        return [next(stream) for _ in range(n)]

    default = first(200)
    same = first(200, text_only=TEXT_ONLY, varied=0.0)
    assert [(ex.scene, ex.turns) for ex in default] == [(ex.scene, ex.turns) for ex in same]  # flags off: unchanged
    assert 0 < sum(ex.image is None for ex in default) < 30
    assert sum(ex.image is None for ex in first(200, text_only=0.3)) > 40
    assert all(ex.image is None and ex.scene is None for ex in first(20, text_only=1.0, varied=1.0))
    assert all(ex.image is not None for ex in first(50, text_only=0.0))
    same = [ex.scene for ex in first(200, text_only=0.0, same_share=1.0) if len(ex.scene.shapes) > 1]
    assert same and all(len({s.name for s in scene.shapes}) == 1 for scene in same)
    mixed = [ex.scene for ex in default if ex.scene is not None and len(ex.scene.shapes) > 1]
    assert any(len({s.name for s in scene.shapes}) > 1 for scene in mixed)


def test_heldout_scenes_are_reproducible_and_cover_one_to_six_shapes() -> None:
    def draw(seed: int) -> list:
        rng = random.Random(seed)
        return [sample_heldout_scene(rng) for _ in range(200)]

    assert draw(HELDOUT_SEED) == draw(HELDOUT_SEED)
    assert {len(s.shapes) for s in draw(HELDOUT_SEED)} == set(range(1, 7))
    rng = random.Random(5)
    scene = sample_heldout_scene(rng)
    assert render_heldout(scene, rng).size == (scene.width, scene.height)


def test_eval_items_of_each_split_differ_and_end_with_text_only_questions() -> None:
    ins, held = list(eval_items(3, 1, "in-dist")), list(eval_items(3, 1, "heldout"))
    assert ins[-1].image is None and held[-1].image is None and held[-1].qa.kind == "no image"
    assert ins[0].image.tobytes() != held[0].image.tobytes()


def test_issue_15_cases_are_drawn() -> None:
    cases = regression_cases()
    assert [c.name for c in cases].count("no image") == 2
    two = cases[0].image
    assert two is not None and two.size == (400, 300)
    blue = sum(1 for x in range(0, 400, 4) if two.getpixel((x, 150))[2] > 150 and two.getpixel((x, 150))[0] < 100)
    assert 30 < blue < 70  # two squares a quarter of the width each


def test_text_only_scoring() -> None:
    assert points_to_pictures("Hello! Send me a picture of shapes and ask about colour, shape, count or position.")
    assert not points_to_pictures("A is in the center.")
    assert not points_to_pictures("The picture shows a red circle.")


def test_fast_pixel_values_match_the_image_processor() -> None:
    processor = build_processor(ModelSize(), build_tokenizer())
    rng = random.Random(0)
    batch = [sample_example(rng) for _ in range(12)]
    images = [ex.image for ex in batch if ex.image is not None]
    reference = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixel_values(images, processor), reference, atol=1e-5)
    chats = [*[ex for ex in batch if ex.image is not None][:3], Example(None, None, (text_only_qa(rng),))]
    ours = collate(chats, processor)
    texts = [processor.apply_chat_template(conversation(ex.turns, with_image=ex.image is not None)) for ex in chats]
    theirs = processor(text=texts, images=images[:3], return_tensors="pt", padding=True)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
