"""Original LLaVA checkpoints (LlavaLlamaForCausalLM / LlavaMistralForCausalLM) in transformers' Llava classes.

The weights (full checkpoint, projector-only or LoRA with --model-base; see `weights`) are renamed
into `LlavaForConditionalGeneration` (`LlavaNextForConditionalGeneration` for
`image_aspect_ratio: anyres`) and loaded in one `from_pretrained` call, so bitsandbytes quantization
and dtype handling are transformers' own. The vision tower is the CLIP folder named by
`mm_vision_tower` (`vision`). Prompts use LLaVA's conversation templates and are tokenized as
LLaVA's `tokenizer_image_token` does, every `<image>` expanded to a run of image tokens that
`LoadedModel.embed` overwrites with features (`prompt`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llava_serve.errors import ModelLoadError
from llava_serve.models.base import LoadedModel
from llava_serve.models.conv_templates import conv_prompt_builder, llava_model_name
from llava_serve.models.hf import context_length, eos_ids
from llava_serve.models.options import LoadOptions
from llava_serve.models.original.configs import is_anyres, llava_config, projector_type, text_config
from llava_serve.models.original.prompt import load_tokenizer, make_encoder, pick_template, stop_token_ids
from llava_serve.models.original.vision import image_prep, resolve_vision_tower, vision_state, vision_tower_config
from llava_serve.models.original.weights import (
    Parts,
    check_keys,
    checkpoint_format,
    expected_keys,
    extend_vocab,
    read_parts,
    runtime_state,
)
from llava_serve.models.quant import detach_from_checkpoint, quantization_config

log = logging.getLogger(__name__)

__all__ = ["load_original"]


def instantiate(cls: Any, cfg: Any, state: dict, options: LoadOptions, device: torch.device, dtype: torch.dtype):
    quant = quantization_config(options.load_8bit, options.load_4bit, device, dtype)
    kwargs: dict[str, Any] = {"config": cfg, "state_dict": state, "dtype": dtype, "output_loading_info": True}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model, info = cls.from_pretrained(None, **kwargs)
    problems = {k: sorted(v)[:3] for k, v in info.items() if v and k != "error_msgs"}
    if problems:
        raise ModelLoadError(f"the checkpoint does not fit {cls.__name__}: {problems}")
    if quant is None:
        model.to(device)
    else:
        detach_from_checkpoint(model)
    return model.eval()


def load_original(
    options: LoadOptions, path: Path, config: dict, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    template = pick_template(options)  # first: a bad --conv-template fails before any weights are read
    fmt = checkpoint_format(path, options.model_base)
    base = Path(options.model_base).expanduser() if options.model_base else None
    if "mm_vision_tower" not in config:
        raise ModelLoadError(f"{path}/config.json has no mm_vision_tower; this is not a LLaVA checkpoint")
    tower = resolve_vision_tower(config["mm_vision_tower"], path, options)
    vision_cfg = vision_tower_config(tower)
    tokenizer, image_token_id = load_tokenizer(path, base, config)
    parts = read_parts(fmt, path, base, text_config(config), dtype)
    cls, cfg, state = llava_weights(config, parts, tower, vision_cfg, len(tokenizer), image_token_id)
    model = instantiate(cls, cfg, state, options, device, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    prep = image_prep(tower, config, vision_cfg, cfg.vision_feature_select_strategy == "full")
    log.info("loaded original LLaVA checkpoint %s (%s layout, template %s)", path, fmt, template.name)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=options.model_name or llava_model_name(options.model_path),
        context_length=context_length(model.config, tokenizer),
        is_multimodal=True,
        encoder=make_encoder(tokenizer, prep, image_token_id, bool(config.get("mm_use_im_start_end"))),
        prompt_builder=conv_prompt_builder(template),
        processor=None,  # no HF processor: image preparation lives in the encoder
        image_token_id=image_token_id,
        eos_token_ids=sorted(set(eos_ids(model, tokenizer) + stop_token_ids(tokenizer, template))),
        batchable_vision=True,
        template_name=template.name,
    )


def llava_weights(
    config: dict, parts: Parts, tower: Path, vision_cfg: Any, n_tokens: int, image_token_id: int
) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(model class, its config, state dict under its parameter names), checked against the class."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    text_cfg = text_config(config)
    text_cfg.vocab_size = max(n_tokens, parts.lm["model.embed_tokens.weight"].shape[0])
    extend_vocab(parts.lm, text_cfg.vocab_size)
    if "lm_head.weight" not in parts.lm and getattr(text_cfg, "tie_word_embeddings", False):
        parts.lm["lm_head.weight"] = parts.lm["model.embed_tokens.weight"]
    cfg = llava_config(config, text_cfg, vision_cfg, image_token_id)
    cls = LlavaNextForConditionalGeneration if is_anyres(config) else LlavaForConditionalGeneration
    expected = expected_keys(cls, cfg)
    prefix = "model.vision_tower."
    vision_keys = {k.removeprefix(prefix) for k in expected if k.startswith(prefix)}
    # LLaVA itself only uses tower weights saved in the checkpoint when it trained (unfroze) them
    overrides = parts.vision if config.get("unfreeze_mm_vision_tower") else {}
    state = runtime_state(parts, vision_state(tower, overrides, vision_keys), projector_type(config))
    check_keys(state, expected)
    return cls, cfg, state
