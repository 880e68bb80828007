"""Tiny random checkpoints of each covered architecture, built from its real transformers config class.

llava, llava_next, internvl and original LLaVA come from the project's own builder (llava-serve build-model);
the rest are built here. Architectures refused at load need only their config.json, written from the real
config class; Mistral3 / Pixtral also get their tokenizer and processor config so the load gets as far as
the processor, which needs torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llava_serve.models.templates import VICUNA_CHAT_TEMPLATE
from llava_serve.tools.checkpoints.build import build
from llava_serve.tools.checkpoints.hf import (
    IMAGE_TOKEN,
    SIZES,
    _randomize,
    build_tokenizer,
    text_config,
)

SIZE = SIZES["tiny"]
BUILT_BY_PROJECT = {"llava": "llava", "llava_next": "llava-next", "internvl": "internvl", "original": "original"}


def build_arch(arch: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if arch in BUILT_BY_PROJECT:
        return build(BUILT_BY_PROJECT[arch], "tiny", out)
    BUILDERS[arch](out)
    return out


def _save(model: Any, processor: Any, tokenizer: Any, out: Path) -> None:
    _randomize(model, 0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_onevision(out: Path) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    tok = build_tokenizer(SIZE.vocab)
    s = SIZE.image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=s, patch_size=8
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text_config(SIZE, len(tok), tok, Qwen2Config),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    from llava_serve.models.hf import without_video_processor

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    # built without its video processor, which needs torchvision (as the project's InternVL builder does)
    processor = without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=(s // 8) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
    _save(LlavaOnevisionForConditionalGeneration(config), processor, tok, out)


def build_idefics3(out: Path) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    torch.manual_seed(0)
    tok = build_tokenizer(SIZE.vocab)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]}
    )
    s = SIZE.image_size
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=s, patch_size=8
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text_config(SIZE, len(tok), tok).to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=2,
        tie_word_embeddings=False,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * s}, max_image_size={"longest_edge": s}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=(s // 8 // 2) ** 2,
        chat_template=IDEFICS3_TEMPLATE,
    )
    _save(Idefics3ForConditionalGeneration(config), processor, tok, out)


# SmolVLM / Idefics3's template: BOS written by the template, images as <image> inside the user turn
IDEFICS3_TEMPLATE = (
    "<s>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def config_only(config: Any, out: Path) -> None:
    config.save_pretrained(out)


def build_refused(arch: str, out: Path) -> None:
    import transformers as tf

    tok = build_tokenizer(SIZE.vocab)
    configs = {
        "gemma3": lambda: tf.Gemma3Config(text_config=text_config(SIZE, len(tok), tok, tf.Gemma3TextConfig).to_dict()),
        "paligemma": lambda: tf.PaliGemmaConfig(text_config=text_config(SIZE, len(tok), tok, tf.GemmaConfig).to_dict()),
        "qwen2_vl": lambda: tf.Qwen2VLConfig(
            text_config=text_config(SIZE, len(tok), tok, tf.Qwen2VLTextConfig).to_dict()
        ),
        "qwen2_5_vl": lambda: tf.Qwen2_5_VLConfig(
            text_config=text_config(SIZE, len(tok), tok, tf.Qwen2_5_VLTextConfig).to_dict()
        ),
    }
    configs[arch]().save_pretrained(out)


def build_needs_torchvision(arch: str, out: Path) -> None:
    """Mistral3 (Mistral text model) or Pixtral (LlavaForConditionalGeneration with a Pixtral tower): real
    weights and tokenizer; the PixtralProcessor config written by hand, as the class cannot be built
    without torchvision."""
    import transformers as tf

    torch.manual_seed(0)
    tok = build_tokenizer(SIZE.vocab)
    tok.add_special_tokens({"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]})
    vision = tf.PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
        head_dim=16,
    )  # fmt: skip
    text = text_config(SIZE, len(tok), tok, tf.MistralConfig)
    image_token_id = tok.convert_tokens_to_ids("[IMG]")
    if arch == "mistral3":
        model = tf.Mistral3ForConditionalGeneration(
            tf.Mistral3Config(vision_config=vision, text_config=text, image_token_index=image_token_id)
        )
    else:
        model = tf.LlavaForConditionalGeneration(
            tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
        )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    tf.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8).save_pretrained(out)
    processor = {
        "processor_class": "PixtralProcessor",
        "patch_size": 8,
        "spatial_merge_size": 1,
        "image_token": "[IMG]",
    }
    (out / "processor_config.json").write_text(json.dumps(processor))


BUILDERS = {
    "llava_onevision": build_onevision,
    "idefics3": build_idefics3,
    **{a: (lambda out, a=a: build_refused(a, out)) for a in ("gemma3", "paligemma", "qwen2_vl", "qwen2_5_vl")},
    **{a: (lambda out, a=a: build_needs_torchvision(a, out)) for a in ("mistral3", "pixtral")},
}
