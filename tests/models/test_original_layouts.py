"""File layouts and config variants of original LLaVA checkpoints: each one loads and answers right."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.models.original.prompt import tokenize_with_images
from tests.models.greedy import generate_greedy, serving_greedy
from tests.models.helpers import user


def copy_of(root: Path, kind: str, dest: Path) -> Path:
    shutil.copytree(root / kind, dest)
    return dest


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def load(path: Path, **kw):
    kw.setdefault("conv_template", "llava_v1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(LoadOptions(model_path=str(path), device="cpu", **kw))


def logits(lm, prompt, images):
    encoded = lm.encode(prompt, images)
    with torch.inference_mode():
        embeds = lm.embed(torch.tensor([encoded.input_ids]), lm.image_features(encoded.images))
        return lm.model(inputs_embeds=embeds).logits


def test_projector_as_safetensors_equals_bin(original_root, load_original, tmp_path, images):
    ckpt = copy_of(original_root, "original-projector", tmp_path / "p")
    state = torch.load(ckpt / "projector" / "mm_projector.bin", weights_only=True)
    save_file(state, str(ckpt / "projector" / "mm_projector.safetensors"))
    (ckpt / "projector" / "mm_projector.bin").unlink()
    lm = load(ckpt / "projector", model_base=str(ckpt / "base"))
    ref = load_original("original-projector")
    prompt = ref.build_prompt([user("Which colour?", 1)])
    torch.testing.assert_close(logits(lm, prompt, images[1:2]), logits(ref, prompt, images[1:2]))


def test_sharded_pytorch_bin_checkpoint(original_root, load_original, tmp_path, images):
    ckpt = copy_of(original_root, "original", tmp_path / "sharded")
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, ckpt / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    lm, ref = load(ckpt), load_original("original")
    prompt = ref.build_prompt([user("Which colour?", 1)])
    torch.testing.assert_close(logits(lm, prompt, images[:1]), logits(ref, prompt, images[:1]))


def test_vision_tower_found_by_hub_name_next_to_the_checkpoint_or_by_flag(original_root, tmp_path):
    ckpt = copy_of(original_root, "original", tmp_path / "models" / "llava-v1.5-tiny")
    edit_config(ckpt, mm_vision_tower="openai/clip-vit-large-patch14-336")
    tower = tmp_path / "models" / "clip-vit-large-patch14-336"
    shutil.move(ckpt / "vision_tower", tower)
    assert load(ckpt).is_multimodal  # a sibling folder with the repo's basename
    moved = tmp_path / "elsewhere" / "clip-vit-large-patch14-336"
    shutil.move(tower, moved)
    assert load(ckpt, vision_tower=str(moved)).is_multimodal  # --vision-tower the folder itself
    assert load(ckpt, vision_tower=str(moved.parent)).is_multimodal  # or a folder holding it
    edit_config(ckpt, mm_vision_tower=str(moved))
    assert load(ckpt).is_multimodal  # an absolute path in config.json


def test_im_start_end_wraps_each_image(original_root, tmp_path, images):
    ckpt = copy_of(original_root, "original", tmp_path / "se")
    edit_config(ckpt, mm_use_im_start_end=True, mm_use_im_patch_token=True)
    lm = load(ckpt)
    tok = lm.tokenizer
    start, end = tok.convert_tokens_to_ids("<im_start>"), tok.convert_tokens_to_ids("<im_end>")
    # LLaVA's order: <im_patch>, <im_start>, <im_end> after the checkpoint's 511 tokens, then <image>
    assert [tok.convert_tokens_to_ids("<im_patch>"), start, end, lm.image_token_id] == [511, 512, 513, 514]
    prompt = lm.build_prompt([user("What is it?", 1)])
    ids = lm.encode(prompt, images[:1]).input_ids
    first = ids.index(lm.image_token_id)
    assert ids[first - 1] == start and ids[first + 16] == end and ids.count(lm.image_token_id) == 16
    assert lm.model.get_input_embeddings().weight.shape[0] == 515
    assert serving_greedy(lm, prompt, images[:1], 8) == generate_greedy(lm, prompt, images[:1], 8)


def test_linear_projector(original_root, tmp_path, images):
    from transformers import CLIPVisionModel

    ckpt = copy_of(original_root, "original", tmp_path / "lin")
    state = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if "mm_projector" not in k}
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(64, 32, generator=gen) / 6, torch.randn(64, generator=gen) / 10
    state.update({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias})
    save_file(state, str(ckpt / "model.safetensors"))
    edit_config(ckpt, mm_projector_type="linear")
    lm = load(ckpt)
    encoded = lm.encode("<image>\nhi", images[1:2])
    clip = CLIPVisionModel.from_pretrained(ckpt / "vision_tower")
    with torch.inference_mode():
        hidden = clip(encoded.images[0].inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(lm.image_features(encoded.images)[0], (hidden @ weight.T + bias)[0])


def test_tower_weights_in_the_checkpoint_are_used_only_when_llava_trained_them(original_root, tmp_path, images):
    ckpt = copy_of(original_root, "original", tmp_path / "unfrozen")
    tower = load_file(str(ckpt / "vision_tower" / "model.safetensors"))
    state = load_file(str(ckpt / "model.safetensors"))
    prefix = "model.vision_tower.vision_tower."
    state.update({prefix + k: v * 1.5 for k, v in tower.items() if k.startswith("vision_model.")})
    save_file(state, str(ckpt / "model.safetensors"))
    frozen = load(ckpt)
    edit_config(ckpt, unfreeze_mm_vision_tower=True)
    trained = load(ckpt)
    key = "encoder.layers.0.mlp.fc1.weight"
    frozen_w = frozen.model.model.vision_tower.state_dict()[key]
    trained_w = trained.model.model.vision_tower.state_dict()[key]
    torch.testing.assert_close(trained_w, tower["vision_model." + key] * 1.5)
    torch.testing.assert_close(frozen_w, tower["vision_model." + key])


def test_mistral_based_checkpoint(original_root, tmp_path, images):
    ckpt = copy_of(original_root, "original", tmp_path / "llava-v1.6-mistral-tiny")
    edit_config(ckpt, architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral", sliding_window=None)
    lm = load(ckpt, conv_template=None)
    assert type(lm.model.model.language_model).__name__ == "MistralModel"
    assert lm.template_name == "mistral_instruct"  # picked from the folder name, as LLaVA's CLI does
    prompt = lm.build_prompt([user("What is it?", 1)])
    assert prompt == "[INST] <image>\nWhat is it? [/INST]"
    assert serving_greedy(lm, prompt, images[:1], 8) == generate_greedy(lm, prompt, images[:1], 8)


def test_tokenized_like_llava_tokenizer_image_token(load_original):
    lm = load_original("original")
    tok = lm.tokenizer
    prompt = "USER: <image>\nfirst<image> second ASSISTANT:"
    run = [lm.image_token_id] * 3
    ids = tokenize_with_images(tok, prompt, [run, run])
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    assert ids == chunks[0] + run + chunks[1][1:] + run + chunks[2][1:]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_tokenizer_gains_image_and_pad_tokens(load_original):
    tok = load_original("original").tokenizer  # the checkpoint's tokenizer has neither
    assert tok.pad_token == "<pad>" and tok.convert_tokens_to_ids("<image>") == 511 and len(tok) == 512


@pytest.mark.parametrize("size", [(40, 40), (97, 13), (20, 120), (64, 33)])
def test_anyres_token_count_matches_the_features(load_original, size):
    from PIL import Image

    lm = load_original("anyres")
    encoded = lm.encode("<image>", [Image.new("RGB", size, (9, 99, 199))])
    assert encoded.input_ids.count(lm.image_token_id) == lm.image_features(encoded.images)[0].shape[0]
