"""Build small random-weight checkpoints offline, for tests and benchmarks.

`llava-serve build-model --kind llava --size tiny --out DIR` writes a checkpoint folder that loads
with plain transformers (and, for the `original*` kinds, in the original LLaVA layout).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llava_serve.models.templates import VICUNA_CHAT_TEMPLATE

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"
# InternVL's image tokens, under the names transformers' InternVLProcessor reads from the tokenizer
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# ChatML, as InternVL -hf checkpoints ship it: each image is `<IMG_CONTEXT>\n` before the message text
INTERNVL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_CORPUS_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "is",
    "was",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "be",
    "are",
    "or",
    "not",
    "his",
    "her",
    "they",
    "we",
    "you",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "circle",
    "square",
    "triangle",
    "star",
    "shape",
    "image",
    "picture",
    "colour",
    "color",
    "what",
    "where",
    "how",
    "many",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "describe",
    "there",
    "one",
    "two",
    "three",
    "assistant",
    "user",
    "human",
    "chat",
    "curious",
    "artificial",
    "intelligence",
    "helpful",
    "detailed",
    "polite",
    "answers",
    "questions",
    "cat",
    "dog",
    "house",
    "tree",
    "café",
    "naïve",
    "東京",
    "こんにちは",
    "😀",
    "über",
    "straße",
    "ñandú",
]


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    context: int = 2048
    pad_vocab: bool = False  # the tokenizer padded with unused tokens to `vocab` (the BPE learns ~570)


SIZES = {
    "tiny": Size(64, 128, 2, 4, 2, 512, 32, 2, 2, 32, 8, 1024),
    "small": Size(256, 688, 4, 8, 4, 1024, 64, 2, 4, 64, 16, 2048),
    # ~170M parameters: a 1024x2816 MLP, 64 image tokens per image
    "bench": Size(1024, 2816, 12, 16, 16, 2048, 256, 4, 4, 128, 16, 2048),
    # TinyLlama-1.1B's decoder (a LLaVA-family small LM: 22 layers x 2048, grouped-query heads, a
    # 32000-token vocabulary, so lm_head weighs what it does in real checkpoints) with the bench's
    # small vision tower: a real-sized step for the integer kernels (benchmarks, not tests)
    "1b": Size(2048, 5632, 22, 32, 4, 32000, 256, 4, 4, 128, 16, 2048, pad_vocab=True),
}


def build_tokenizer(vocab_size: int, seed: int = 0, pad: bool = False) -> Any:
    """A byte-level BPE trained on a generated corpus: any text encodes, multi-byte chars split;
    `pad`: unused `<extra_N>` tokens appended up to `vocab_size` (the corpus teaches ~570)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choices(_CORPUS_WORDS, k=12)) for _ in range(4000)]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # room for <image>
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if pad and len(fast) < vocab_size:
        fast.add_tokens([f"<extra_{i}>" for i in range(vocab_size - len(fast))])  # not special: they decode to text
    fast.chat_template = VICUNA_CHAT_TEMPLATE
    return fast


def text_config(size: Size, vocab: int, tokenizer: Any, config_class: Any = None) -> Any:
    """The decoder's config for `size` (a LlamaConfig unless `config_class` names another family)."""
    if config_class is None:
        from transformers import LlamaConfig as config_class

    return config_class(
        vocab_size=vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def vision_config(size: Size) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 4,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )


def clip_image_processor(size: Size) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )


def build_hf(kind: str, size: Size, out: Path, seed: int) -> None:
    """kind: llava | llava-next | text."""
    from transformers import (
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    steps = tqdm(total=4, desc=f"build {kind}/{out.name}", disable=not sys.stderr.isatty())
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(size.vocab, seed, pad=size.pad_vocab)
    vocab = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    steps.update()
    if kind == "text":
        model = LlamaForCausalLM(text_config(size, vocab, tokenizer))
        processor = None
    elif kind == "llava":
        config = LlavaConfig(
            vision_config=vision_config(size),
            text_config=text_config(size, vocab, tokenizer),
            image_token_id=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=clip_image_processor(size),
            tokenizer=tokenizer,
            patch_size=size.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=VICUNA_CHAT_TEMPLATE,
        )
    elif kind == "llava-next":
        s = size.image_size
        pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        config = LlavaNextConfig(
            vision_config=vision_config(size),
            text_config=text_config(size, vocab, tokenizer),
            image_token_id=image_token_id,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=size.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=VICUNA_CHAT_TEMPLATE,
        )
    else:
        raise ValueError(f"unknown kind {kind!r}")
    _randomize(model, seed)
    steps.update()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    steps.update()
    (processor or tokenizer).save_pretrained(out)
    steps.update()
    steps.close()


def internvl_tokenizer(size: Size, seed: int) -> Any:
    """builder's tokenizer with InternVL's image tokens (named, as transformers 5 reads them) and ChatML turns."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(size.vocab, seed).backend_tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        extra_special_tokens=INTERNVL_TOKENS,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [*INTERNVL_TOKENS.values(), *CHATML_TOKENS]})
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


def build_internvl(size: Size, out: Path, seed: int) -> None:
    """An InternVL -hf checkpoint (InternVLForConditionalGeneration, Qwen2 text model, GotOcr2 tiling)."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    from llava_serve.models.hf import without_video_processor

    steps = tqdm(total=4, desc=f"build internvl/{out.name}", disable=not sys.stderr.isatty())
    torch.manual_seed(seed)
    tokenizer = internvl_tokenizer(size, seed)
    s = size.image_size
    # the vision tower's patch grid, 2x2 patches merged into one token by the pixel shuffle (downsample_ratio 0.5)
    image_seq_length = (s // size.patch_size // 2) ** 2
    steps.update()
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 4,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=s,
            patch_size=size.patch_size,
        ),
        text_config=text_config(size, len(tokenizer), tokenizer, Qwen2Config),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    _randomize(model, seed)
    steps.update()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    steps.update()
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": s, "width": s},
        crop_to_patches=True,
        min_patches=1,
        max_patches=4,  # the real checkpoints allow 12 tiles; fewer keep test prompts short
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    # built without its video processor, which needs torchvision; its config is written by hand below
    processor = without_video_processor(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    processor_config = out / "processor_config.json"
    saved = json.loads(processor_config.read_text())
    saved["video_processor"] = {
        "video_processor_type": "InternVLVideoProcessor",
        "size": {"height": s, "width": s},
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }
    processor_config.write_text(json.dumps(saved, indent=2) + "\n")
    steps.update()
    steps.close()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Larger-than-default init so a random model's greedy output varies with its input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = 0.5 / param.shape[-1] ** 0.5 if "embed" not in name else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * std)
