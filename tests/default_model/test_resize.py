"""resize.py: a tower converted to a larger input and patch sees an upsampled picture as the original
saw the original; on another grid its positions are resampled as transformers interpolates them; the
converted folder loads and generates with plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llava_serve.default_model.build import ModelSize, build_model, build_processor, save_checkpoint
from llava_serve.default_model.data import Scene, Shape, render
from llava_serve.default_model.resize import convert, grow_tower, pi_resize_kernel, resize_model, resize_processor
from llava_serve.default_model.tokenizer import build_tokenizer

SMALL = ModelSize(image_size=48, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
                  text_hidden=32, text_layers=1, text_heads=2)  # fmt: skip


def test_pi_resized_kernel_gives_the_same_embedding_for_an_upsampled_patch() -> None:
    torch.manual_seed(0)
    kernel = torch.randn(8, 3, 16, 16)
    patches = torch.randn(5, 3, 16, 16)
    bigger = pi_resize_kernel(kernel, 24)
    assert bigger.shape == (8, 3, 24, 24)
    upsampled = F.interpolate(patches, size=(24, 24), mode="bilinear", align_corners=False)
    before = torch.einsum("nchw,ochw->no", patches, kernel)
    after = torch.einsum("nchw,ochw->no", upsampled, bigger)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(pi_resize_kernel(kernel, 16), kernel)


def test_converted_tower_sees_an_upsampled_picture_as_the_original_saw_the_original() -> None:
    tokenizer = build_tokenizer()
    model = build_model(SMALL, tokenizer, seed=0).eval()
    original = build_model(SMALL, tokenizer, seed=0).eval()
    resize_model(model, 72, 24)
    assert model.config.vision_config.image_size == 72 and model.config.vision_config.patch_size == 24
    scene = Scene(200, 200, (246, 244, 240), (Shape("circle", "red", 0.3, 0.4, 0.4, 0.4),
                                              Shape("star", "blue", 0.7, 0.7, 0.3, 0.3, 10.0)))  # fmt: skip
    processor = build_processor(SMALL, tokenizer)
    pixels = processor.image_processor(render(scene), return_tensors="pt")["pixel_values"]
    upsampled = F.interpolate(pixels, size=(72, 72), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        before = original.model.vision_tower(pixels).last_hidden_state
        after = model.model.vision_tower(upsampled).last_hidden_state
    assert after.shape == before.shape  # the same grid: 9 patches and CLS
    assert ((after - before).norm() / before.norm()).item() < 0.05
    with pytest.raises(ValueError, match="whole number"):
        resize_model(model, 100, 24)


def test_another_grid_resamples_the_positions_as_transformers_interpolates_them(tmp_path: Path) -> None:
    """3x3 -> 6x6 patches: the converted tower at its own size computes what transformers'
    interpolate_pos_encoding makes of the original at that size; the folder sends 36 image tokens."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    original = build_model(SMALL, tokenizer, seed=0).eval()
    model = build_model(SMALL, tokenizer, seed=0).eval()
    resize_model(model, 96, 16)
    embeddings = model.model.vision_tower.embeddings
    assert embeddings.position_embedding.weight.shape == (37, SMALL.vision_hidden)
    assert model.config.image_seq_length == 36 and model.config.vision_config.image_size == 96
    torch.testing.assert_close(embeddings.position_embedding.weight[0],
                               original.model.vision_tower.embeddings.position_embedding.weight[0])  # fmt: skip
    pixels = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        interpolated = original.model.vision_tower(pixels, interpolate_pos_encoding=True).last_hidden_state
        converted = model.model.vision_tower(pixels).last_hidden_state
    assert converted.shape == (2, 37, SMALL.vision_hidden)
    torch.testing.assert_close(converted, interpolated, rtol=1e-4, atol=1e-4)

    processor = build_processor(SMALL, tokenizer)
    resize_processor(processor, 96, 16)
    save_checkpoint(model, processor, tmp_path / "g6")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "g6").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "g6")
    scene = Scene(120, 90, (246, 244, 240), (Shape("square", "green", 0.5, 0.5, 0.3, 0.4),))
    inputs = processor(text="USER: <image>\nWhat? ASSISTANT:", images=[render(scene)], return_tensors="pt")
    assert int((inputs["input_ids"] == loaded.config.image_token_id).sum()) == 36
    with torch.inference_mode():
        assert loaded.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


def test_converted_folder_loads_with_plain_transformers_and_generates(tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    save_checkpoint(build_model(SMALL, tokenizer, seed=0).eval(), build_processor(SMALL, tokenizer), tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "b", 72, 24)
    processor = AutoProcessor.from_pretrained(tmp_path / "b")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
    assert model.config.vision_config.image_size == 72 and processor.image_processor.size["height"] == 72
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    scene = Scene(120, 90, (246, 244, 240), (Shape("square", "green", 0.5, 0.5, 0.3, 0.4),))
    inputs = processor(text=prompt, images=[render(scene)], return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (72, 72)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 9
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_resize_processor_sets_size_crop_and_patch() -> None:
    processor = build_processor(SMALL, build_tokenizer())
    resize_processor(processor, 72, 24)
    assert processor.image_processor.size == {"height": 72, "width": 72}
    assert processor.image_processor.crop_size == {"height": 72, "width": 72}
    assert processor.patch_size == 24


def test_grown_tower_starts_as_the_identity_and_saves_with_its_new_depth(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    model = build_model(SMALL, tokenizer, seed=0).eval()
    processor = build_processor(SMALL, tokenizer)
    scene = Scene(200, 160, (246, 244, 240), (Shape("triangle", "green", 0.4, 0.5, 0.4, 0.5),))
    inputs = processor(text="USER: <image>\nWhat? ASSISTANT:", images=[render(scene)], return_tensors="pt")
    with torch.inference_mode():
        before = model(**inputs).logits
    grow_tower(model, 2)
    with torch.inference_mode():
        after = model(**inputs).logits
    assert model.config.vision_config.num_hidden_layers == SMALL.vision_layers + 2
    assert len(model.model.vision_tower.encoder.layers) == SMALL.vision_layers + 2
    torch.testing.assert_close(after, before)
    new = model.model.vision_tower.encoder.layers[-1]
    assert new.self_attn.out_proj.weight.abs().max() == 0 and new.mlp.fc2.weight.abs().max() == 0
    assert new.self_attn.q_proj.weight.abs().max() > 0  # not zero everywhere: the copy of the last layer
    save_checkpoint(model, processor, tmp_path / "grown")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "grown").eval()
    assert loaded.config.vision_config.num_hidden_layers == SMALL.vision_layers + 2
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**inputs).logits, after, rtol=1e-2, atol=1e-2)  # float16 on disk
    with pytest.raises(ValueError, match="cannot remove"):
        grow_tower(model, -1)
