"""transformers configs built from an original LLaVA config.json (LlamaConfig fields + mm_* fields)."""

from __future__ import annotations

from typing import Any

from llava_serve.errors import ModelLoadError

TEXT_ARCHS = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
# config.json keys that belong to LLaVA's multimodal wrapper, not to the language model
_LLAVA_KEY_PREFIXES = ("mm_", "image_", "tune_", "freeze_", "unfreeze_", "tokenizer_", "use_mm_", "s2")
_NOT_TEXT_KEYS = {"architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def text_config(config: dict) -> Any:
    from transformers import LlamaConfig, MistralConfig

    archs = config.get("architectures") or ["LlavaLlamaForCausalLM"]
    if any("Mpt" in a for a in archs) or "mpt" in config.get("model_type", ""):
        raise ModelLoadError("LLaVA-MPT checkpoints are not supported; use a Llama or Mistral based LLaVA")
    family = next((TEXT_ARCHS[a] for a in archs if a in TEXT_ARCHS), None)
    if family is None and "mistral" in config.get("model_type", ""):
        family = "mistral"
    kwargs = {k: v for k, v in config.items() if k not in _NOT_TEXT_KEYS and not k.startswith(_LLAVA_KEY_PREFIXES)}
    if kwargs.get("rope_scaling", 0) is None:
        del kwargs["rope_scaling"]  # a legacy null; transformers 5 warns about the key itself
    return (MistralConfig if family == "mistral" else LlamaConfig)(**kwargs)


def llava_config(config: dict, text_cfg: Any, vision_cfg: Any, image_token_id: int) -> Any:
    from transformers import LlavaConfig, LlavaNextConfig

    if int(config.get("mm_hidden_size", vision_cfg.hidden_size)) != vision_cfg.hidden_size:
        raise ModelLoadError(
            f"mm_hidden_size {config['mm_hidden_size']} does not match the vision tower's hidden size "
            f"{vision_cfg.hidden_size}; is --vision-tower the tower this checkpoint was trained with?"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ModelLoadError(f"mm_vision_select_feature {feature!r} is not supported (patch or cls_patch)")
    common = {
        "vision_config": vision_cfg,
        "text_config": text_cfg,
        "image_token_id": image_token_id,
        "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": "default" if feature == "patch" else "full",
        "projector_hidden_act": "gelu" if projector_type(config) == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(getattr(text_cfg, "tie_word_embeddings", False)),
    }
    if not is_anyres(config):
        return LlavaConfig(**common)
    return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints(config))


def projector_type(config: dict) -> str:
    kind = config.get("mm_projector_type", "linear")
    if kind not in ("linear", "mlp2x_gelu"):
        raise ModelLoadError(f"mm_projector_type {kind!r} is not supported (linear or mlp2x_gelu)")
    return kind


def is_anyres(config: dict) -> bool:
    aspect = config.get("image_aspect_ratio", "square") or "square"
    if aspect.startswith("anyres") and aspect != "anyres":
        raise ModelLoadError(f"image_aspect_ratio {aspect!r} is not supported (pad, square or anyres)")
    if aspect == "anyres" and config.get("mm_patch_merge_type", "flat") != "spatial_unpad":
        raise ModelLoadError("anyres is supported with mm_patch_merge_type 'spatial_unpad' only (LLaVA-1.6)")
    return aspect == "anyres"


def pinpoints(config: dict) -> list[list[int]]:
    points = config.get("image_grid_pinpoints")
    if not isinstance(points, list) or not points:
        raise ModelLoadError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {points!r}")
    return [list(map(int, p)) for p in points]
