"""The default model's architecture, image processor and processor, and how a checkpoint is saved.

Everything here is plain transformers: ``LlavaForConditionalGeneration`` with a CLIP vision tower
and a Llama decoder, a ``LlavaImageProcessor`` (CLIP normalisation, padded to a square first, as
LLaVA-1.5 does) and a ``LlavaProcessor`` carrying the chat template.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llava_serve.default_model.tokenizer import CHAT_TEMPLATE, IMAGE

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ModelSize:
    image_size: int = 96
    patch_size: int = 16  # (96 / 16)^2 = 36 image tokens; the 3x3 position grid is 2x2 patches a cell
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    max_positions: int = 512

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def model_config(size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=3 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads,
        max_position_embeddings=size.max_positions,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        vision_feature_layer=-1,  # a tower this small has no spare layer to skip
        image_seq_length=size.image_tokens,
    )


def build_processor(size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        do_pad=True,  # keep shapes' proportions for any aspect ratio
        size={"height": size.image_size, "width": size.image_size},
        do_center_crop=False,
        crop_size={"height": size.image_size, "width": size.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(model_config(size, tokenizer))
    model.generation_config = generation_config(tokenizer)
    init_position_embeddings(model, size)
    return model


def init_position_embeddings(model: LlavaForConditionalGeneration, size: ModelSize) -> None:
    """2-D sine-cosine start for the tower's (learned) position embeddings.

    CLIP's default start (std 0.02) is ~50x smaller than a patch embedding here; trained from
    scratch, the tower then goes hundreds of steps without knowing where a patch is, which stalls
    shape recognition (a matter of where edges are) and position questions.
    """
    grid, dim = size.image_size // size.patch_size, size.vision_hidden
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    freqs = torch.exp(-math.log(100.0) * torch.arange(dim // 4) / (dim // 4))

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.flatten()[:, None].float() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1)
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        weight[0].zero_()  # CLS
        weight[1:] = table


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=48,
    )


def save_checkpoint(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path) -> None:
    """Save fp16 weights (half the size) with ``dtype: float32`` so a plain load is float32."""
    out.mkdir(parents=True, exist_ok=True)
    half = LlavaForConditionalGeneration(model.config)
    half.load_state_dict(model.state_dict())
    half.generation_config = model.generation_config
    half.to(torch.float16).save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    _set_dtype(config, "float32")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    tokenizer_config = out / "tokenizer_config.json"  # a processor loaded from a folder records that
    if tokenizer_config.is_file():
        saved = json.loads(tokenizer_config.read_text())
        if "is_local" in saved or "local_files_only" in saved:
            saved.pop("is_local", None)
            saved.pop("local_files_only", None)
            tokenizer_config.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")


def _set_dtype(config: dict, dtype: str) -> None:
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    for sub in ("vision_config", "text_config"):
        if isinstance(config.get(sub), dict):
            _set_dtype(config[sub], dtype)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
