"""average.py: two checkpoints of one architecture averaged weight by weight, saved as a loadable folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_serve.default_model.average import average, average_state
from llava_serve.default_model.build import ModelSize, build_model, build_processor, save_checkpoint
from llava_serve.default_model.tokenizer import build_tokenizer

SMALL = ModelSize(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                  text_hidden=32, text_layers=1, text_heads=2)  # fmt: skip


def test_average_state_is_the_weighted_mean_and_checks_shapes() -> None:
    a, b = {"w": torch.ones(2, 3)}, {"w": torch.zeros(2, 3)}
    assert torch.equal(average_state(a, b, 0.25)["w"], torch.full((2, 3), 0.25))
    assert torch.equal(average_state(a, b, 1.0)["w"], a["w"])
    with pytest.raises(ValueError, match="shape"):
        average_state(a, {"w": torch.zeros(3, 2)}, 0.5)
    with pytest.raises(ValueError, match="different tensors"):
        average_state(a, {"v": torch.zeros(2, 3)}, 0.5)
    with pytest.raises(ValueError, match="from 0 to 1"):
        average_state(a, b, 1.5)


def test_averaged_folder_loads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(SMALL, tokenizer)
    for seed in (0, 1):
        save_checkpoint(build_model(SMALL, tokenizer, seed=seed).eval(), processor, tmp_path / f"m{seed}")
    average(tmp_path / "m0", tmp_path / "m1", tmp_path / "avg", 0.5)
    models = [LlavaForConditionalGeneration.from_pretrained(tmp_path / n) for n in ("m0", "m1", "avg")]
    first, second, mean = (dict(m.state_dict()) for m in models)
    for name, value in mean.items():
        torch.testing.assert_close(value, (first[name] + second[name]) / 2, rtol=2e-3, atol=2e-3)  # float16 on disk
    assert (tmp_path / "avg" / "processor_config.json").is_file()
