"""The training command end to end on a tiny size, and the evaluation through a real worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_serve.default_model import default_model_path
from llava_serve.default_model.batches import TEXT_ONLY
from llava_serve.default_model.build import ModelSize
from llava_serve.default_model.data import SAME_SHARE
from llava_serve.default_model.eval import WorkerAnswerer, evaluate, started_worker
from llava_serve.default_model.train import TrainConfig, parse_weights, train

TINY = ModelSize(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                 text_hidden=32, text_layers=1, text_heads=2)  # fmt: skip


def test_question_weights_are_checked_when_the_config_is_made() -> None:
    assert parse_weights("") is None
    assert parse_weights("colour=3,shape=0.5") == {"colour": 3.0, "shape": 0.5, "count": 1.0,
                                                   "position": 1.0, "describe": 1.0}  # fmt: skip
    with pytest.raises(ValueError, match="unknown kind 'size'"):
        TrainConfig(question_weights="size=2")
    with pytest.raises(ValueError, match="'colour' is not KIND=NUMBER"):
        TrainConfig(question_weights="colour")
    with pytest.raises(ValueError, match="are shares, from 0 to 1"):
        TrainConfig(text_only=1.5)
    with pytest.raises(ValueError, match="are shares, from 0 to 1"):
        TrainConfig(varied_greetings=-0.1)
    with pytest.raises(ValueError, match="are shares, from 0 to 1"):
        TrainConfig(same_scenes=2)
    assert (TrainConfig().text_only, TrainConfig().varied_greetings) == (TEXT_ONLY, 0.0)  # off by default
    assert TrainConfig().same_scenes == SAME_SHARE
    with pytest.raises(ValueError, match="only with --init-from"):
        TrainConfig(grow_tower=2)


def test_train_saves_checkpoints_and_continues_from_one(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    small = {"vision_batch_size": 2, "batch_size": 2, "warmup": 1, "threads": 1}
    out = tmp_path / "m"
    train(TrainConfig(vision_steps=2, steps=2, save_every=1, out=out, **small), TINY)
    assert (out / "model.safetensors").is_file() and (tmp_path / "m-step1" / "model.safetensors").is_file()
    first = LlavaForConditionalGeneration.from_pretrained(out)
    more = tmp_path / "m2"
    train(TrainConfig(init_from=out, vision_steps=0, steps=1, question_weights="colour=4", out=more, **small), TINY)
    second = LlavaForConditionalGeneration.from_pretrained(more)
    tower = [(a - b).abs().max().item() for a, b in zip(first.model.vision_tower.parameters(),
                                                         second.model.vision_tower.parameters())]  # fmt: skip
    decoder = [(a - b).abs().max().item() for a, b in zip(first.model.language_model.parameters(),
                                                           second.model.language_model.parameters())]  # fmt: skip
    assert max(tower) == 0.0  # no vision stage, no heads: the tower stays frozen
    assert max(decoder) > 0.0  # the dialogue stage trained on
    grown = tmp_path / "m3"
    train(TrainConfig(init_from=out, grow_tower=1, vision_steps=1, steps=1, density_weight=1.0, count_weight=1.0,
                      out=grown, **small), TINY)  # fmt: skip
    third = LlavaForConditionalGeneration.from_pretrained(grown)
    assert third.config.vision_config.num_hidden_layers == TINY.vision_layers + 1


def test_eval_through_a_worker_it_starts() -> None:
    with started_worker(default_model_path(), "cpu", concurrency=4) as address:
        report = evaluate(WorkerAnswerer(address), n=8, seed=20_000, progress=False, concurrency=4)
    acc = report["accuracy"]  # one question of each kind per image, where the kind fits the scene
    assert acc["count"]["total"] == acc["describe"]["total"] == 8 and sum(acc[k]["total"] for k in acc) >= 32
    asked = sum(acc[k]["total"] for k in ("colour", "shape", "count"))
    # far above chance (1/6 colours, 1/4 kinds, 1/6 counts); the model's accuracy: docs/default_model.md
    assert sum(acc[k]["correct"] for k in ("colour", "shape", "count")) >= 0.5 * asked, acc
    assert acc["no image"]["total"] == 12 and acc["no image"]["correct"] >= 11, report["failures"]
    assert len(report["regression"]) == 8
    assert all(r["ok"] for r in report["regression"] if r["case"] == "no image"), report["regression"]


def test_eval_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no checkpoint at"), started_worker(tmp_path, "cpu", 1):
        pass


def test_continuing_at_another_image_and_patch_size_converts_the_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with pytest.raises(ValueError, match="go together"):
        TrainConfig(image_size=48)
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig(image_size=50, patch_size=24)
    small = {"vision_batch_size": 2, "batch_size": 2, "warmup": 1, "threads": 1}
    train(TrainConfig(vision_steps=1, steps=1, out=tmp_path / "m", **small), TINY)
    more = tmp_path / "m2"
    train(TrainConfig(init_from=tmp_path / "m", image_size=48, patch_size=24, vision_steps=1, steps=1, out=more,
                      **small), TINY)  # fmt: skip
    model = LlavaForConditionalGeneration.from_pretrained(more)
    assert (model.config.vision_config.image_size, model.config.vision_config.patch_size) == (48, 24)
    assert model.model.vision_tower.embeddings.patch_embedding.weight.shape[-2:] == (24, 24)
    assert AutoProcessor.from_pretrained(more).image_processor.size == {"height": 48, "width": 48}
    finer = tmp_path / "m3"  # another grid: 2x2 -> 3x3 patches of 24 px, trained with count densities
    train(TrainConfig(init_from=more, image_size=72, patch_size=24, vision_steps=1, steps=1, density_weight=1.0,
                      out=finer, **small), TINY)  # fmt: skip
    model = LlavaForConditionalGeneration.from_pretrained(finer)
    assert model.config.image_seq_length == 9 and model.model.vision_tower.embeddings.num_patches == 9
