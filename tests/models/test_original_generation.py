"""Original-format checkpoints (full, projector-only, LoRA, anyres) generate what plain transformers generates.

Two different references:
- the serving path (encode -> image_features -> embed -> forward with a DynamicCache) equals
  `model.generate` on the same loaded model, token for token;
- the loaded model equals the same weights converted to transformers' layout by an independent
  converter (builder_original.convert_to_hf: module-by-module copy, LoRA merged by hand) and run
  with transformers' own processor and generate.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from tests.models.greedy import generate_greedy, pixel_inputs, serving_greedy
from tests.models.helpers import user

MAX_NEW = 12
KINDS = ["original", "original-projector", "original-lora", "anyres"]


def conversations(images):
    return [
        ([user("Describe the picture.", 1)], images[:1]),
        ([user("What colour is the shape?", 1)], images[2:3]),
        ([user("What is the difference between these pictures?", 2)], images[0:2]),
        ([user("Tell me about a cat.")], []),
        ([user("What is this?", 1), {"role": "assistant", "content": "A square."}, user("Are you sure?")], images[3:4]),
        ([user("And this one, left or right?", 1)], images[4:5]),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_serving_path_equals_generate(load_original, images, kind):
    lm = load_original(kind)
    outputs = []
    for messages, imgs in conversations(images):
        prompt = lm.build_prompt(messages)
        ours = serving_greedy(lm, prompt, imgs, MAX_NEW)
        assert ours == generate_greedy(lm, prompt, imgs, MAX_NEW), prompt
        outputs.append(tuple(ours))
    assert len(set(outputs)) > 2  # the answers depend on the inputs, so equality means something


def _reference(kind, path):
    cls = LlavaNextForConditionalGeneration if kind == "anyres" else LlavaForConditionalGeneration
    return cls.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("kind", KINDS)
def test_same_answer_as_the_weights_in_hf_layout(load_original, hf_twin, images, kind):
    lm = load_original(kind)
    model, processor = _reference(kind, hf_twin(kind))
    # 'pad' and HF's resize+crop agree on square images; anyres uses LlavaNext's tiling on both sides
    cases = images if kind == "anyres" else [images[0], images[1], images[3]]
    for image in cases:
        prompt = lm.build_prompt([user("What is in the image?", 1)])
        ids, pixels = pixel_inputs(lm, prompt, [image])
        ref = processor(text=prompt, images=[image], return_tensors="pt")
        assert ids.tolist() == ref["input_ids"].tolist()
        assert torch.equal(pixels["pixel_values"], ref["pixel_values"])
        with torch.inference_mode():
            ours = lm.model(input_ids=ids, **pixels).logits
            theirs = model(**ref).logits
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
            expected = model.generate(**ref, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=lm.eos_token_ids)
        assert serving_greedy(lm, prompt, [image], MAX_NEW) == expected[0, ids.shape[1] :].tolist()


def test_text_only_prompt_matches_hf_layout(load_original, hf_twin):
    lm = load_original("original-lora")
    model, processor = _reference("original-lora", hf_twin("original-lora"))
    prompt = lm.build_prompt([user("Write two words about a dog.")])
    ref = processor.tokenizer(prompt, return_tensors="pt")
    expected = model.generate(**ref, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=lm.eos_token_ids)
    assert serving_greedy(lm, prompt, [], MAX_NEW) == expected[0, ref["input_ids"].shape[1] :].tolist()


def test_lora_adapter_changes_the_model(load_original):
    """original-projector and original-lora share base LM and projector (same seed); only the adapter differs."""
    lora, plain, full = load_original("original-lora"), load_original("original-projector"), load_original("original")
    ids = torch.tensor([lora.encode(lora.build_prompt([user("Hello there.")]), []).input_ids])
    with torch.inference_mode():
        logits = {
            name: lm.model(input_ids=ids).logits for name, lm in (("lora", lora), ("plain", plain), ("full", full))
        }
    torch.testing.assert_close(logits["plain"], logits["full"])  # same weights, two layouts
    assert (logits["lora"] - logits["plain"]).abs().max() > 0.1


def test_image_features_are_llava_projector_on_the_penultimate_clip_layer(load_original, original_root, images):
    """Independent of transformers' Llava: CLIP hidden_states[-2] without CLS -> Linear, GELU, Linear."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    lm = load_original("original")
    weights = load_file(str(original_root / "original" / "model.safetensors"))
    w = {k.removeprefix("model.mm_projector."): v for k, v in weights.items() if "mm_projector" in k}
    clip = CLIPVisionModel.from_pretrained(original_root / "original" / "vision_tower")
    encoded = lm.encode("<image>\nhi", [images[2]])
    pixels = encoded.images[0].inputs["pixel_values"]
    with torch.inference_mode():
        hidden = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = torch.nn.functional.gelu(hidden @ w["0.weight"].T + w["0.bias"]) @ w["2.weight"].T + w["2.bias"]
    torch.testing.assert_close(lm.image_features(encoded.images)[0], expected[0], atol=1e-5, rtol=1e-5)


def test_pad_fills_with_the_mean_colour(load_original, images):
    """LLaVA-1.5's 'pad': a wide image is centred on a square of the CLIP mean colour before resizing."""
    from PIL import Image

    lm = load_original("original")
    wide = images[4]  # 90x24
    square = Image.new("RGB", (90, 90), tuple(int(x * 255) for x in (0.48145466, 0.4578275, 0.40821073)))
    square.paste(wide, (0, (90 - 24) // 2))
    a = lm.encode("<image>", [wide]).images[0].inputs["pixel_values"]
    b = lm.encode("<image>", [square]).images[0].inputs["pixel_values"]
    assert torch.equal(a, b)


def test_loaded_model_fields(load_original):
    lm = load_original("original")
    assert lm.is_multimodal and lm.batchable_vision and lm.processor is None
    assert lm.template_name == "llava_v1"
    assert lm.tokenizer.convert_tokens_to_ids("<image>") == lm.image_token_id == lm.model.config.image_token_id
    assert lm.eos_token_ids == [lm.tokenizer.eos_token_id]
    assert lm.context_length == 1024
    assert lm.name == "original"
