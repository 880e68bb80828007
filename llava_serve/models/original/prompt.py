"""Tokenizer, prompt template and encoder of an original LLaVA checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from llava_serve.errors import ModelLoadError
from llava_serve.models.base import IMAGE_PLACEHOLDER, EncodedPrompt, PreparedImage
from llava_serve.models.conv_templates import ConvTemplate, get_template, llava_model_name, template_for_model
from llava_serve.models.options import LoadOptions
from llava_serve.models.original.vision import ImagePrep

IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"


def load_tokenizer(path: Path, base: Path | None, config: dict) -> tuple[Any, int]:
    """LLaVA's extra tokens, then `<image>` and a pad token as transformers' LLaVA conversion adds them."""
    from transformers import AddedToken, AutoTokenizer

    sources = [base, path] if base is not None else [path]  # LLaVA reads the tokenizer of --model-base
    source = next((s for s in sources if _has_tokenizer(s)), None)
    if source is None:
        raise ModelLoadError(
            f"no tokenizer files (tokenizer.json / tokenizer.model) in {' or '.join(map(str, sources))}"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if config.get("mm_use_im_patch_token", True):
        tokenizer.add_tokens([IM_PATCH], special_tokens=True)
    if config.get("mm_use_im_start_end", False):
        tokenizer.add_tokens([IM_START, IM_END], special_tokens=True)
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def tokenize_with_images(tokenizer: Any, prompt: str, runs: Sequence[list[int]]) -> list[int]:
    """LLaVA's tokenizer_image_token: tokenize the text between images, BOS once, image runs between."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id)
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend(runs[i - 1])
        ids.extend(chunk[offset:])
    return ids


def make_encoder(tokenizer: Any, prep: ImagePrep, image_token_id: int, im_start_end: bool):
    def encode(prompt: str, images: Sequence[Image.Image], keys: Sequence[str]) -> EncodedPrompt:
        if im_start_end:
            prompt = prompt.replace(IMAGE_PLACEHOLDER, IM_START + IMAGE_PLACEHOLDER + IM_END)
        units, runs = [], []
        for image, key in zip(images, keys):
            inputs, n_tokens = prep(image)
            units.append(PreparedImage(key=key, inputs=inputs))
            runs.append([image_token_id] * n_tokens)
        return EncodedPrompt(input_ids=tokenize_with_images(tokenizer, prompt, runs), images=units)

    return encode


def pick_template(options: LoadOptions) -> ConvTemplate:
    name = options.conv_template or template_for_model(options.model_name or llava_model_name(options.model_path))
    return get_template(name)


def stop_token_ids(tokenizer: Any, template: ConvTemplate) -> list[int]:
    """The template's stop string, when it is a special token of this tokenizer (`<|im_end|>`, `</s>`)."""
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return [tokenizer.convert_tokens_to_ids(template.stop)] if template.stop in specials else []
