"""Random-weight checkpoints in the original LLaVA layout, and a converter to transformers' layout.

kinds (`llava-serve build-model --kind ...`):
  original            OUT = a full LLaVA checkpoint; OUT/vision_tower = its CLIP folder
  original-projector  OUT/base = a plain LlamaForCausalLM; OUT/projector = config.json + mm_projector.bin
  original-lora       OUT/base; OUT/lora = adapter_config.json + adapter + non_lora_trainables.bin
All kinds write OUT/vision_tower (a full CLIPModel folder, like openai/clip-vit-*), named by
`mm_vision_tower: vision_tower`. `convert_to_hf(OUT, HF_OUT)` writes the model the files describe
(LoRA merged by hand, not by peft) as a LlavaForConditionalGeneration checkpoint, so tests can check
the original-format loader against plain transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from llava_serve.models.templates import VICUNA_CHAT_TEMPLATE
from llava_serve.tools.checkpoints.hf import (
    IMAGE_TOKEN,
    Size,
    _randomize,
    build_tokenizer,
    clip_image_processor,
    text_config,
    vision_config,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 4, 8
TOWER = "vision_tower"


def original_tokenizer(size: Size, seed: int) -> Any:
    """builder's tokenizer without `<image>` and without a pad token, as LLaVA's Vicuna tokenizer ships."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(build_tokenizer(size.vocab, seed).backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != IMAGE_TOKEN]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def llava_config_dict(size: Size, tokenizer: Any, aspect: str) -> dict:
    """config.json as LLaVA's training writes it (LlamaConfig fields + mm_* fields, legacy rope keys)."""
    text = text_config(size, len(tokenizer), tokenizer).to_dict()
    text.pop("rope_parameters", None)
    text.pop("transformers_version", None)
    s = size.image_size
    text.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        rope_theta=10000.0,
        rope_scaling=None,
        pad_token_id=0,
        mm_vision_tower=TOWER,
        mm_hidden_size=size.vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="spatial_unpad" if aspect == "anyres" else "flat",
        image_aspect_ratio=aspect,
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]],
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        use_mm_proj=True,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=size.context,
    )
    return text


def random_language_model(size: Size, tokenizer: Any, seed: int) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(text_config(size, len(tokenizer), tokenizer))
    _randomize(model, seed)
    return model


def random_tower(size: Size, seed: int) -> Any:
    """A full CLIPModel (text side included), like the openai folders LLaVA names."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=128,
        max_position_embeddings=16, projection_dim=size.vision_hidden, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision_config(size).to_dict())
    cfg.projection_dim = size.vision_hidden
    torch.manual_seed(seed + 1)
    tower = CLIPModel(cfg)
    _randomize(tower, seed + 1)
    return tower


def random_projector(size: Size, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 2)
    first = torch.randn(size.hidden, size.vision_hidden, generator=gen) / size.vision_hidden**0.5
    second = torch.randn(size.hidden, size.hidden, generator=gen) / size.hidden**0.5
    bias = torch.randn(2, size.hidden, generator=gen) * 0.1
    return {"0.weight": first, "0.bias": bias[0], "2.weight": second, "2.bias": bias[1]}


def write_tower(size: Size, out: Path, seed: int) -> None:
    random_tower(size, seed).save_pretrained(out / TOWER)
    clip_image_processor(size).save_pretrained(out / TOWER)


def write_llava_config(size: Size, tokenizer: Any, folder: Path, aspect: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llava_config_dict(size, tokenizer, aspect), indent=2))


def _mm_state(size: Size, seed: int, aspect: str, prefix: str) -> dict[str, torch.Tensor]:
    state = {f"{prefix}mm_projector.{k}": v for k, v in random_projector(size, seed).items()}
    if aspect == "anyres":
        gen = torch.Generator().manual_seed(seed + 3)
        state[f"{prefix}image_newline"] = torch.randn(size.hidden, generator=gen)
    return state


def build_full(size: Size, out: Path, seed: int, aspect: str) -> None:
    from safetensors.torch import save_file

    tokenizer = original_tokenizer(size, seed)
    lm = random_language_model(size, tokenizer, seed)
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    state.update(_mm_state(size, seed, aspect, "model."))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_llava_config(size, tokenizer, out, aspect)
    tokenizer.save_pretrained(out)
    write_tower(size, out, seed)
    print(f"original LLaVA checkpoint: --model-path {out}")


def write_base(size: Size, out: Path, seed: int) -> tuple[Any, Any]:
    tokenizer = original_tokenizer(size, seed)
    lm = random_language_model(size, tokenizer, seed)
    lm.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    write_tower(size, out, seed)
    return tokenizer, lm


def build_projector(size: Size, out: Path, seed: int, aspect: str) -> None:
    tokenizer, _ = write_base(size, out, seed)
    write_llava_config(size, tokenizer, out / "projector", aspect)
    torch.save(_mm_state(size, seed, aspect, "model."), out / "projector" / "mm_projector.bin")
    print(f"projector-only checkpoint: --model-path {out / 'projector'} --model-base {out / 'base'}")


def build_lora(size: Size, out: Path, seed: int, aspect: str) -> None:
    from peft import LoraConfig, get_peft_model

    tokenizer, lm = write_base(size, out, seed)
    lora_cfg = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(lm, lora_cfg)
    gen = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # peft starts lora_B at zero; a no-op adapter would prove nothing
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    peft_model.save_pretrained(out / "lora")
    write_llava_config(size, tokenizer, out / "lora", aspect)
    torch.save(_mm_state(size, seed, aspect, "base_model.model.model."), out / "lora" / "non_lora_trainables.bin")
    print(f"LoRA checkpoint: --model-path {out / 'lora'} --model-base {out / 'base'}")


def build_original(kind: str, size: Size, out: Path, seed: int, *, aspect: str = "pad") -> None:
    """aspect: LLaVA's image_aspect_ratio, 'pad' (LLaVA-1.5), 'square' or 'anyres' (LLaVA-1.6)."""
    out.mkdir(parents=True, exist_ok=True)
    builders = {"original": build_full, "original-projector": build_projector, "original-lora": build_lora}
    if kind not in builders:
        raise ValueError(f"unknown kind {kind!r}; one of {sorted(builders)}")
    builders[kind](size, out, seed, aspect)


# ---------------------------------------------------------------- the same weights in HF layout


def original_files(out: Path) -> tuple[Path, dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(folder with config.json, LLaVA config, LM state, mm state) of a build_original output."""
    from safetensors.torch import load_file

    if (out / "model.safetensors").is_file():
        state = load_file(str(out / "model.safetensors"))
        mm = {k: state.pop(k) for k in list(state) if "mm_projector" in k or "image_newline" in k}
        return out, json.loads((out / "config.json").read_text()), state, mm
    base = load_file(str(out / "base" / "model.safetensors"))
    if (out / "projector").is_dir():
        mm = torch.load(out / "projector" / "mm_projector.bin", weights_only=True)
        return out / "projector", json.loads((out / "projector" / "config.json").read_text()), base, mm
    non_lora = torch.load(out / "lora" / "non_lora_trainables.bin", weights_only=True)
    mm = {k.removeprefix("base_model.model."): v for k, v in non_lora.items()}
    return (
        out / "lora",
        json.loads((out / "lora" / "config.json").read_text()),
        merge_by_hand(base, out / "lora"),
        mm,
    )


def merge_by_hand(base: dict[str, torch.Tensor], lora_dir: Path) -> dict[str, torch.Tensor]:
    """W + (alpha / r) * B @ A for every adapted Linear: the merge, without peft."""
    from safetensors.torch import load_file

    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    adapter = load_file(str(lora_dir / "adapter_model.safetensors"))
    merged = dict(base)
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        target = key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"
        merged[target] = base[target] + scale * (b @ a)
    return merged


def convert_to_hf(out: Path, hf_out: Path) -> Path:
    """Write the model a build_original folder describes as a transformers Llava/LlavaNext checkpoint."""
    from transformers import AddedToken, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    folder, cfg, lm_state, mm = original_files(out)
    tokenizer = AutoTokenizer.from_pretrained(out if folder == out else out / "base")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vocab = len(tokenizer)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # new rows: mean of the old ones
        w = lm_state[key]
        lm_state[key] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab - w.shape[0], -1)])
    with _quiet_transformers():  # the CLIP folder's text half is reported as unexpected keys
        tower = CLIPVisionModel.from_pretrained(out / TOWER)
    model = _hf_model(cfg, tower.config, vocab, tokenizer)
    with torch.no_grad():
        model.model.language_model.load_state_dict(
            {k.removeprefix("model."): v for k, v in lm_state.items() if k != "lm_head.weight"}
        )
        model.lm_head.weight.copy_(lm_state["lm_head.weight"])
        model.model.vision_tower.load_state_dict(tower.state_dict())
        projector = model.model.multi_modal_projector
        for index, linear in (("0", projector.linear_1), ("2", projector.linear_2)):
            linear.weight.copy_(mm[f"model.mm_projector.{index}.weight"])
            linear.bias.copy_(mm[f"model.mm_projector.{index}.bias"])
        if "model.image_newline" in mm:
            model.model.image_newline.copy_(mm["model.image_newline"])
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(hf_out)
    _hf_processor(cfg, tokenizer, CLIPImageProcessor.from_pretrained(out / TOWER), tower.config).save_pretrained(hf_out)
    return hf_out


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _hf_model(cfg: dict, vision_cfg: Any, vocab: int, tokenizer: Any) -> Any:
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    common = {
        "vision_config": vision_cfg,
        "text_config": text,
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_feature_layer": cfg["mm_vision_select_layer"],
        "vision_feature_select_strategy": "default",
    }
    if cfg["image_aspect_ratio"] == "anyres":
        return LlavaNextForConditionalGeneration(
            LlavaNextConfig(**common, image_grid_pinpoints=cfg["image_grid_pinpoints"])
        )
    return LlavaForConditionalGeneration(LlavaConfig(**common))


def _hf_processor(cfg: dict, tokenizer: Any, clip: Any, vision_cfg: Any) -> Any:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    common = {
        "tokenizer": tokenizer,
        "patch_size": vision_cfg.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": VICUNA_CHAT_TEMPLATE,
    }
    if cfg["image_aspect_ratio"] != "anyres":
        return LlavaProcessor(image_processor=clip, **common)
    tiled = LlavaNextImageProcessor.from_dict({**clip.to_dict(), "image_grid_pinpoints": cfg["image_grid_pinpoints"]})
    return LlavaNextProcessor(image_processor=tiled, **common)
