"""Bad original-format inputs fail at load with a ModelLoadError that says what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llava_serve.errors import ModelLoadError
from llava_serve.models.loader import LoadOptions, load_model


def copy_of(root: Path, kind: str, dest: Path) -> Path:
    shutil.copytree(root / kind, dest)
    return dest


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def load_error(**kw) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(LoadOptions(device="cpu", **kw))
    return str(err.value)


def test_missing_vision_tower_says_what_to_pass(original_root, tmp_path):
    ckpt = copy_of(original_root, "original", tmp_path / "ckpt")
    edit_config(ckpt, mm_vision_tower="openai/clip-vit-large-patch14-336")
    message = load_error(model_path=str(ckpt))
    assert "openai/clip-vit-large-patch14-336" in message and "--vision-tower" in message
    assert str(ckpt.parent / "clip-vit-large-patch14-336") in message  # where it looked


def test_vision_tower_flag_that_points_nowhere(original_root):
    message = load_error(model_path=str(original_root / "original"), vision_tower="/nonexistent/clip")
    assert "--vision-tower /nonexistent/clip" in message


def test_missing_projector_file(original_root, tmp_path):
    folder = tmp_path / "projector"
    folder.mkdir()
    shutil.copy(original_root / "original-projector" / "projector" / "config.json", folder)
    base = str(original_root / "original-projector" / "base")
    message = load_error(model_path=str(folder), model_base=base)
    assert "mm_projector.safetensors" in message and "mm_projector.bin" in message and "adapter_config.json" in message


def test_full_checkpoint_without_projector_weights(original_root, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = copy_of(original_root, "original", tmp_path / "noproj")
    state = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if "mm_projector" not in k}
    save_file(state, str(ckpt / "model.safetensors"))
    assert "no mm_projector weights" in load_error(model_path=str(ckpt))


def test_unknown_conv_template_lists_valid_names(original_root):
    message = load_error(model_path=str(original_root / "original"), conv_template="vicuna_v9")
    assert "vicuna_v9" in message and "llava_v1" in message and "chatml_direct" in message


@pytest.mark.parametrize(("kind", "folder"), [("original-lora", "lora"), ("original-projector", "projector")])
def test_partial_checkpoints_need_model_base(original_root, kind, folder):
    assert "--model-base" in load_error(model_path=str(original_root / kind / folder))


def test_model_base_that_does_not_exist(original_root):
    message = load_error(model_path=str(original_root / "original-lora" / "lora"), model_base="/nonexistent/base")
    assert "--model-base /nonexistent/base" in message


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu'"),
        ({"architectures": ["LlavaMptForCausalLM"]}, "MPT"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size 1024"),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "flat"}, "spatial_unpad"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature"),
    ],
)
def test_unsupported_config_values(original_root, tmp_path, changes, needle):
    ckpt = copy_of(original_root, "original", tmp_path / "ckpt")
    edit_config(ckpt, **changes)
    assert needle in load_error(model_path=str(ckpt))


class NotATensor:
    pass


def test_projector_bin_is_loaded_weights_only(original_root, tmp_path):
    """A pickle that would run code (or build arbitrary objects) is refused, not executed."""
    ckpt = copy_of(original_root, "original-projector", tmp_path / "p")
    torch.save({"model.mm_projector.0.weight": NotATensor()}, ckpt / "projector" / "mm_projector.bin")
    message = load_error(model_path=str(ckpt / "projector"), model_base=str(ckpt / "base"))
    assert "weights_only=True" in message
