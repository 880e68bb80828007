"""Original LLaVA weights: reading them, telling the three layouts apart, merging LoRA, renaming.

Layouts, decided from the files present (never from the name):
  full       the language model and `model.mm_projector.*` in --model-path
  projector  --model-path holds config.json + mm_projector.{safetensors,bin}; the LM is --model-base
  lora       --model-path holds adapter_config.json + adapter + non_lora_trainables.bin; the LM is
             --model-base, and the adapter is merged into it with peft
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llava_serve.errors import ModelLoadError

PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
NON_LORA_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: (sharded) safetensors preferred, else .bin with weights_only."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return _read_files([folder / s for s in shards])
        if (folder / single).is_file():
            return _read_files([folder / single])
    raise ModelLoadError(f"{folder} has no weights (model.safetensors or pytorch_model.bin, optionally sharded)")


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or corrupt pickles
        raise ModelLoadError(f"{path}: cannot be read with torch.load(weights_only=True) ({exc})") from None


def _read_files(files: list[Path]) -> dict[str, torch.Tensor]:
    from tqdm import tqdm

    out: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="read shards", disable=len(files) < 2):
        if not file.is_file():
            raise ModelLoadError(f"{file} is listed in the shard index but missing")
        out.update(read_tensor_file(file))
    return out


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


@dataclass
class Parts:
    """A LLaVA checkpoint split by destination, keys as LLaVA saved them."""

    lm: dict[str, torch.Tensor] = field(default_factory=dict)  # LlamaForCausalLM names
    projector: dict[str, torch.Tensor] = field(default_factory=dict)  # "0.weight", "2.bias" / "weight"
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # CLIP names ("vision_model.…")
    newline: torch.Tensor | None = None

    def update(self, other: Parts) -> None:
        self.lm.update(other.lm)
        self.projector.update(other.projector)
        self.vision.update(other.vision)
        if other.newline is not None:
            self.newline = other.newline


def split_llava_keys(state: dict[str, torch.Tensor]) -> Parts:
    parts = Parts()
    for key, tensor in state.items():
        key = _strip_wrappers(key)
        if "mm_projector." in key:
            parts.projector[key.split("mm_projector.", 1)[1]] = tensor
        elif key.startswith("model.vision_tower.vision_tower."):
            parts.vision[key.removeprefix("model.vision_tower.vision_tower.")] = tensor
        elif key.endswith("image_newline"):
            parts.newline = tensor
        elif "rotary_emb.inv_freq" in key or key.startswith(("model.vision_resampler.", "model.vision_tower.")):
            continue  # buffers from old transformers; LLaVA's unused resampler
        else:
            parts.lm[key] = tensor
    return parts


def _strip_wrappers(key: str) -> str:
    """peft's `base_model.model.` and the doubled `model.model.` of non_lora_trainables.bin."""
    key = key.removeprefix("base_model.model.")
    return key[len("model.") :] if key.startswith("model.model.") else key


def checkpoint_format(path: Path, model_base: str | None) -> str:
    has_adapter = (path / "adapter_config.json").is_file()
    projector = _first_file(path, PROJECTOR_FILES)
    if model_base is None:
        if has_adapter:
            raise ModelLoadError(
                f"{path} is a LoRA adapter; pass --model-base with the language model it was trained on"
            )
        if projector is not None and not _has_lm_weights(path):
            raise ModelLoadError(f"{path} holds only {projector.name}; pass --model-base with the language model")
        return "full"
    if not Path(model_base).expanduser().is_dir():
        raise ModelLoadError(f"--model-base {model_base}: no such folder")
    if has_adapter:
        return "lora"
    if projector is not None:
        return "projector"
    raise ModelLoadError(
        f"--model-base was given but {path} has neither adapter_config.json (a LoRA checkpoint) nor "
        f"{' / '.join(PROJECTOR_FILES)} (a projector-only checkpoint); drop --model-base for a full checkpoint"
    )


def _has_lm_weights(path: Path) -> bool:
    return any(path.glob("model*.safetensors*")) or any(path.glob("pytorch_model*.bin*"))


def read_parts(fmt: str, path: Path, base: Path | None, text_cfg: Any, dtype: torch.dtype) -> Parts:
    if fmt == "full":
        parts = split_llava_keys(read_weights(path))
        where = f"{path}"
    elif fmt == "projector":
        parts = split_llava_keys(read_weights(base))
        projector_file = _first_file(path, PROJECTOR_FILES)
        parts.update(split_llava_keys(read_tensor_file(projector_file)))
        where = f"{projector_file}"
    else:
        parts = split_llava_keys(read_weights(base))
        non_lora = _first_file(path, NON_LORA_FILES)
        if non_lora is not None:
            parts.update(split_llava_keys(read_tensor_file(non_lora)))
        parts.lm = merge_lora(parts.lm, text_cfg, path, dtype)
        where = f"{path}/non_lora_trainables.bin"
    if not parts.projector:
        raise ModelLoadError(f"no mm_projector weights found in {where}; is this a LLaVA checkpoint?")
    return parts


def merge_lora(lm: dict[str, torch.Tensor], text_cfg: Any, adapter: Path, dtype: torch.dtype) -> dict:
    """Merge a LoRA adapter trained on LLaVA's LM into the base LM weights, with peft."""
    from peft import PeftModel

    model = _causal_lm_class(text_cfg).from_pretrained(
        None,
        config=_with_vocab(text_cfg, lm),
        state_dict={k: v.to(dtype) for k, v in lm.items()},
        dtype=dtype,
    )
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{adapter}: the LoRA adapter does not fit the --model-base model ({exc})") from None
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _causal_lm_class(text_cfg: Any) -> Any:
    from transformers import LlamaForCausalLM, MistralForCausalLM

    return MistralForCausalLM if text_cfg.model_type == "mistral" else LlamaForCausalLM


def _with_vocab(text_cfg: Any, lm: dict[str, torch.Tensor]) -> Any:
    text_cfg.vocab_size = lm["model.embed_tokens.weight"].shape[0]
    return text_cfg


def extend_vocab(lm: dict[str, torch.Tensor], size: int) -> None:
    """New embedding and output rows = the mean of the existing rows, so no new token wins an argmax."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weight = lm[key]
        if weight.shape[0] < size:
            mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
            lm[key] = torch.cat([weight, mean.expand(size - weight.shape[0], -1)])


def runtime_state(parts: Parts, vision: dict, kind: str) -> dict[str, torch.Tensor]:
    """LLaVA names -> the parameter names of transformers' Llava / LlavaNext models."""
    state = {"model.vision_tower." + k: v for k, v in vision.items()}
    for key, tensor in parts.lm.items():
        state[key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")] = tensor
    proj = "model.multi_modal_projector."
    if kind == "mlp2x_gelu":
        for key, tensor in parts.projector.items():
            index, _, leaf = key.partition(".")
            state[f"{proj}linear_{1 if index == '0' else 2}.{leaf}"] = tensor
    else:  # one Linear: linear_1 carries it, linear_2 is the identity (exact in float)
        weight = parts.projector["weight"]
        state[proj + "linear_1.weight"], state[proj + "linear_1.bias"] = weight, parts.projector["bias"]
        state[proj + "linear_2.weight"] = torch.eye(weight.shape[0], dtype=weight.dtype)
        state[proj + "linear_2.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if parts.newline is not None:
        state["model.image_newline"] = parts.newline
    return state


def expected_keys(cls: Any, cfg: Any) -> set[str]:
    with torch.device("meta"):
        return set(cls(cfg).state_dict())


def check_keys(state: dict, expected: set[str]) -> None:
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"the checkpoint does not map onto transformers' Llava: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
