"""InternVL -hf checkpoints (transformers' InternVLForConditionalGeneration) through the generic HF loader.

The checkpoint is `llava-serve build-model --kind internvl --size tiny`: 32x32 tiles of 8x8 patches, so each
tile is 4x4 patches, merged 2x2 by the pixel shuffle into 4 `<IMG_CONTEXT>` tokens. As InternVL's processor does,
an image is cut into the grid of tiles closest to its aspect ratio (at most 4 here), plus a thumbnail tile when
the grid has more than one, and each image becomes `<img>` + 4 tokens per tile + `</img>`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_serve.engine.engine import BatchEngine
from llava_serve.errors import ImageCountMismatch
from llava_serve.models.base import IMAGE_PLACEHOLDER, LoadedModel
from llava_serve.models.hf import model_class
from llava_serve.models.loader import LoadOptions, is_original_llava, load_model
from llava_serve.models.options import read_config
from llava_serve.tools.checkpoints.build import build
from tests.engine.helpers import Case, Collector, greedy, make_cases, reference
from tests.models.helpers import user

TOKENS_PER_TILE = 4


@pytest.fixture(scope="module")
def internvl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("internvl", "tiny", tmp_path_factory.mktemp("internvl") / "internvl")


@pytest.fixture(scope="module")
def lm(internvl_path: Path) -> LoadedModel:
    return load_model(LoadOptions(model_path=str(internvl_path), device="cpu"))


def image_runs(lm: LoadedModel, ids: list[int]) -> list[int]:
    """The number of tokens between each `<img>` and `</img>`, checking they are all `<IMG_CONTEXT>`."""
    tok = lm.tokenizer
    runs, start = [], None
    for i, token in enumerate(ids):
        if token == tok.start_image_token_id:
            start = i + 1
        elif token == tok.end_image_token_id:
            assert start is not None, "</img> without <img>"
            assert set(ids[start:i]) == {lm.image_token_id}
            runs.append(i - start)
            start = None
    assert start is None, "<img> without </img>"
    return runs


def test_folder_loads_with_plain_transformers(internvl_path):
    from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(internvl_path)
    assert isinstance(model.config, InternVLConfig) and model.config.text_config.model_type == "qwen2"
    tok = AutoTokenizer.from_pretrained(internvl_path)
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert tok.context_image_token_id == model.config.image_token_id
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    saved = json.loads((internvl_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "InternVLProcessor"
    assert saved["image_processor"]["image_processor_type"] == "GotOcr2ImageProcessor"
    assert saved["video_processor"]["video_processor_type"] == "InternVLVideoProcessor"


def test_auto_processor_loads_it_where_torchvision_is_installed(internvl_path):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor, InternVLProcessor

    processor = AutoProcessor.from_pretrained(internvl_path)
    assert type(processor) is InternVLProcessor and processor.video_processor is not None


def test_loader_sees_a_multimodal_hf_checkpoint(lm, internvl_path):
    from transformers import AutoConfig, InternVLForConditionalGeneration, InternVLProcessor

    config = read_config(internvl_path)
    assert not is_original_llava(config) and "vision_config" in config
    assert model_class(AutoConfig.from_pretrained(internvl_path)) is InternVLForConditionalGeneration
    assert lm.is_multimodal and isinstance(lm.model, InternVLForConditionalGeneration)
    assert isinstance(lm.processor, InternVLProcessor) and lm.processor.image_seq_length == TOKENS_PER_TILE
    assert lm.image_token_id == lm.tokenizer.context_image_token_id == lm.model.config.image_token_id
    assert lm.eos_token_ids == [lm.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert not lm.batchable_vision  # get_image_features returns one tensor for all tiles of all images
    assert lm.context_length == 1024


@pytest.mark.parametrize(
    ("sizes", "tiles"),
    [
        ([(32, 32)], [1]),  # square: one tile, no thumbnail
        ([(96, 32), (32, 32)], [4, 1]),  # 3:1 -> a 3x1 grid + thumbnail, then one tile
        # ~1:2 -> a 1x2 grid + thumbnail; a square twice the tile -> 2x2 (the tie with 1x1 goes to more tiles while
        # the image covers over half of them) + thumbnail
        ([(40, 90), (64, 64)], [3, 5]),
    ],
)
def test_each_placeholder_gets_the_processors_image_tokens(lm, sizes, tiles):
    images = [Image.new("RGB", size, (40 * i, 120, 200)) for i, size in enumerate(sizes)]
    prompt = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + "What is in these pictures?"
    encoded = lm.encode(prompt, images)
    assert image_runs(lm, encoded.input_ids) == [TOKENS_PER_TILE * t for t in tiles]
    assert encoded.input_ids.count(lm.image_token_id) == TOKENS_PER_TILE * sum(tiles)
    text = lm.tokenizer.decode([t for t in encoded.input_ids if t != lm.image_token_id], skip_special_tokens=False)
    assert text.endswith("\nWhat is in these pictures?") and IMAGE_PLACEHOLDER not in text
    pixels = torch.cat([u.inputs["pixel_values"] for u in encoded.images])
    assert pixels.shape == (sum(tiles), 3, 32, 32)
    features = lm.image_features(encoded.images)
    assert sum(f.shape[0] for f in features) == TOKENS_PER_TILE * sum(tiles)
    embeds = lm.embed(torch.tensor([encoded.input_ids]), features)  # raises if features and tokens disagree
    assert embeds.shape == (1, len(encoded.input_ids), lm.model.config.text_config.hidden_size)


def test_batch_engine_greedy_matches_generate_alone(lm):
    cases = make_cases(lm, 6)  # no image, one image or two, of different aspect ratios
    assert {len(c.images) for c in cases} == {0, 1, 2}
    tokens = [8 + 3 * (i % 3) for i in range(len(cases))]
    # plain transformers takes InternVL's own image token, not the LLaVA placeholder
    refs = [
        reference(lm, Case(c.prompt.replace(IMAGE_PLACEHOLDER, lm.processor.image_token), c.images), n)
        for c, n in zip(cases, tokens)
    ]
    engine = BatchEngine(lm, max_running=4, max_waiting=16).start()
    try:
        collectors = []
        for i, (case, n) in enumerate(zip(cases, tokens)):
            col = Collector(lm, case, greedy(n))
            engine.submit(col.request)
            collectors.append(col)
            time.sleep(0.01 * (i % 2))
        for i, col in enumerate(collectors):
            assert col.wait().finish_reason == "length"
            assert col.request.output_ids == refs[i], f"request {i} differs from model.generate"
        assert engine.queue_length() == 0
    finally:
        engine.shutdown()


def test_chat_messages_use_the_processors_template(lm):
    messages = [
        {"role": "system", "content": "You are terse."},
        user("Compare these.", n_images=2),
        {"role": "assistant", "content": "One is red."},
        user("And now?"),
    ]
    prompt = lm.build_prompt(messages)
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\nCompare these.<|im_end|>\n"
        "<|im_start|>assistant\nOne is red.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    rendered = lm.processor.apply_chat_template(messages[:2], add_generation_prompt=False, tokenize=False)
    assert lm.build_prompt(messages[:2], add_generation_prompt=False) == rendered.replace(
        lm.processor.image_token, IMAGE_PLACEHOLDER
    )
    images = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))]
    assert image_runs(lm, lm.encode(prompt, images).input_ids) == [TOKENS_PER_TILE, TOKENS_PER_TILE]


def test_a_wrong_number_of_images_is_refused_clearly(lm):
    one = Image.new("RGB", (32, 32), (1, 2, 3))
    prompt = lm.build_prompt([user("Describe.", n_images=2)])
    with pytest.raises(ImageCountMismatch, match=r"2 <image> placeholder\(s\) but 1 image\(s\) were sent"):
        lm.encode(prompt, [one])
    with pytest.raises(ImageCountMismatch, match=r"0 <image> placeholder\(s\) but 1 image\(s\)"):
        lm.encode(lm.build_prompt([user("Describe.")]), [one])
    with pytest.raises(ImageCountMismatch, match=r"1 <image> placeholder\(s\) but 0 image\(s\)"):
        lm.encode(f"{IMAGE_PLACEHOLDER}\nDescribe.", [])
