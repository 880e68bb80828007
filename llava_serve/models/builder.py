"""Build small random-weight checkpoints offline, for tests and benchmarks.

`llava-serve build-model --kind llava --size tiny --out DIR` writes a checkpoint folder that loads
with plain transformers (and, for the `original*` kinds, in the original LLaVA layout).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llava_serve.models.templates import VICUNA_CHAT_TEMPLATE

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"
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


SIZES = {
    "tiny": Size(64, 128, 2, 4, 2, 512, 32, 2, 2, 32, 8, 1024),
    "small": Size(256, 688, 4, 8, 4, 1024, 64, 2, 4, 64, 16, 2048),
    # ~170M parameters: a 1024x2816 MLP, 64 image tokens per image
    "bench": Size(1024, 2816, 12, 16, 16, 2048, 256, 4, 4, 128, 16, 2048),
}


def build_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE trained on a generated corpus: any text encodes, multi-byte chars split."""
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
    fast.chat_template = VICUNA_CHAT_TEMPLATE
    return fast


def text_config(size: Size, vocab: int, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
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
    tokenizer = build_tokenizer(size.vocab, seed)
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


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Larger-than-default init so a random model's greedy output varies with its input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = 0.5 / param.shape[-1] ** 0.5 if "embed" not in name else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build(kind: str, size_name: str, out: Path, seed: int = 0) -> Path:
    size = SIZES[size_name]
    out.mkdir(parents=True, exist_ok=True)
    if kind in ("llava", "llava-next", "text"):
        build_hf(kind, size, out, seed)
    else:
        from llava_serve.models.builder_original import build_original

        build_original(kind, size, out, seed)
    return out


KINDS = ["llava", "llava-next", "text", "original", "original-projector", "original-lora"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-serve build-model", description=__doc__)
    parser.add_argument("--kind", choices=KINDS, default="llava")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build(args.kind, args.size, args.out, args.seed)
    n_params = _count_params(path)
    print(f"wrote {args.kind}/{args.size} checkpoint to {path} ({n_params / 1e6:.1f}M parameters)")
    return 0


def _count_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                total += math.prod(f.get_slice(key).get_shape())  # get_shape() is a list
    return total
