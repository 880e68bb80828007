"""Hugging Face checkpoints: Llava, LlavaNext, InternVL -hf, other image-text-to-text, text-only LMs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava_serve.errors import InvalidRequest, ModelLoadError
from llava_serve.models.base import IMAGE_PLACEHOLDER, EncodedPrompt, LoadedModel, Message, PreparedImage
from llava_serve.models.options import LoadOptions
from llava_serve.models.quant import detach_from_checkpoint, quantization_config
from llava_serve.models.templates import fallback_prompt

log = logging.getLogger(__name__)

# families whose get_image_features returns one tensor per image, so images batch across requests
BATCHABLE_VISION = {"llava", "llava_next"}
NON_PIXEL_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}


def model_class(config: Any) -> Any:
    import transformers as tf

    if getattr(config, "vision_config", None) is None:
        return tf.AutoModelForCausalLM
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        cls = getattr(tf, arch, None)
        if cls is not None and arch.endswith("ForConditionalGeneration"):
            return cls
    return tf.AutoModelForImageTextToText


def load_hf(options: LoadOptions, path: Path, raw_config: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoTokenizer

    trust = options.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: transformers cannot read this config ({exc})") from None
    multimodal = getattr(config, "vision_config", None) is not None
    quant = quantization_config(options.load_8bit, options.load_4bit, device, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    processor = load_processor(path, config, trust) if multimodal else None  # first: it may need torchvision
    model = model_class(config).from_pretrained(path, **kwargs)
    if quant is None:
        model.to(device)
    else:
        detach_from_checkpoint(model)
    model.eval()
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(path)
    return wrap_hf_model(model, tokenizer, processor, options.name)


def load_processor(path: Path, config: Any, trust: bool) -> Any:
    """AutoProcessor, or the same processor without its video processor where torchvision is missing."""
    try:
        return _auto_processor(path, config, trust)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        raise ModelLoadError(f"{path}: {missing_torchvision(config)}") from None


def _auto_processor(path: Path, config: Any, trust: bool) -> Any:
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available() and type(config) in PROCESSOR_MAPPING:
        image_only = without_video_processor(PROCESSOR_MAPPING[type(config)])
        if image_only is not None:
            log.info("%s: torchvision is not installed; loading the processor without its video processor", path)
            return image_only.from_pretrained(path)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust)


def _kind(config: Any) -> str:
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    return f"{config.model_type} ({vision} vision)" if vision else config.model_type


def missing_torchvision(config: Any) -> str:
    return (
        f"the processor of this {_kind(config)} checkpoint needs torchvision, which is not installed; "
        "install the torchvision build that matches your torch (`pip install 'llava-serve[vision]'`, "
        "see docs/models.md)"
    )


def without_video_processor(processor_class: Any) -> Any | None:
    """`processor_class` without its video processor (InternVL's, say), or None when it has none to drop.

    Without torchvision transformers cannot build a processor that has a video processor, not even with
    `video_processor=None`: every sub-processor is checked against a class that only exists with torchvision.
    Images need only the image processor and the tokenizer. The video processor must be the last sub-processor:
    ProcessorMixin pairs positional sub-processors with `get_attributes()` by `zip`, so the None passed for it
    is dropped there.
    """
    attributes = processor_class.get_attributes()
    if not attributes or attributes[-1] != "video_processor":
        return None
    kept = attributes[:-1]

    class ImageOnlyProcessor(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return list(kept)

        @classmethod
        def from_args_and_dict(cls, args, processor_dict, **kwargs):
            processor_dict = {k: v for k, v in processor_dict.items() if k != "video_processor"}
            return super().from_args_and_dict(args, processor_dict, **kwargs)

    # saved configs name the real class, so a folder written with it loads with AutoProcessor too
    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    return ImageOnlyProcessor


def wrap_hf_model(model: Any, tokenizer: Any, processor: Any, name: str) -> LoadedModel:
    config = model.config
    multimodal = processor is not None and getattr(config, "vision_config", None) is not None
    image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER) if multimodal else None
    image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if multimodal and image_token_id is None and image_token:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    family = getattr(config, "model_type", "")
    encoder = _processor_encoder(processor, image_token, family in BATCHABLE_VISION) if multimodal else None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        name=name,
        context_length=context_length(config, tokenizer),
        is_multimodal=multimodal,
        encoder=encoder or _text_encoder(tokenizer),
        prompt_builder=_chat_template_builder(processor or tokenizer, tokenizer, image_token),
        image_token_id=image_token_id,
        eos_token_ids=eos_ids(model, tokenizer),
        batchable_vision=family in BATCHABLE_VISION and hasattr(model, "get_image_features"),
        template_name="hf-chat-template",
    )


def context_length(config: Any, tokenizer: Any) -> int:
    text_config = getattr(config, "text_config", None) or config
    for attr in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1_000_000 else 2048


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(int(v) for v in value)
    return sorted(set(ids))


def _text_encoder(tokenizer: Any):
    def encode(prompt: str, images: Sequence[Image.Image], keys: Sequence[str]) -> EncodedPrompt:
        return EncodedPrompt(input_ids=list(tokenizer(prompt).input_ids))

    return encode


def _processor_encoder(processor: Any, image_token: str | None, per_image: bool):
    def encode(prompt: str, images: Sequence[Image.Image], keys: Sequence[str]) -> EncodedPrompt:
        text = prompt.replace(IMAGE_PLACEHOLDER, image_token) if image_token else prompt
        try:
            # one sample's images nested, as apply_chat_template passes them: LLaVA-OneVision tiles an image
            # only when it is alone in its sample
            out = processor(text=text, images=[list(images)] if images else None, return_tensors="pt")
        except ValueError as exc:  # the processor's own checks (PaliGemma needs an image, say): the request's fault
            raise InvalidRequest(f"the model's processor refused this prompt: {exc}") from None
        input_ids = out["input_ids"][0].tolist()
        pixels = {k: v for k, v in out.items() if k not in NON_PIXEL_KEYS and isinstance(v, torch.Tensor)}
        if not images:
            return EncodedPrompt(input_ids=input_ids)
        if per_image and all(v.shape[0] == len(images) for v in pixels.values()):
            units = [
                PreparedImage(key=key, inputs={k: v[i : i + 1] for k, v in pixels.items()})
                for i, key in enumerate(keys)
            ]
        else:
            units = [PreparedImage(key="|".join(keys), inputs=pixels, num_images=len(images))]
        return EncodedPrompt(input_ids=input_ids, images=units)

    return encode


def _chat_template_builder(template_owner: Any, tokenizer: Any, image_token: str | None):
    has_template = bool(getattr(template_owner, "chat_template", None))
    adds_bos = tokenizer_adds_bos(tokenizer)

    def build(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if not has_template:
            return fallback_prompt(messages, add_generation_prompt)
        normalized = [_normalize(m) for m in messages]
        text = template_owner.apply_chat_template(
            normalized, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and adds_bos:
            text = text[len(bos) :]  # encode() lets the tokenizer add it, as transformers' processor does
        if image_token and image_token != IMAGE_PLACEHOLDER:
            text = text.replace(image_token, IMAGE_PLACEHOLDER)
        return text

    return build


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizing adds BOS: asked, since transformers 5 ignores `add_bos_token` beside a tokenizer.json."""
    bos_id = tokenizer.bos_token_id
    return bos_id is not None and list(tokenizer("a").input_ids[:1]) == [bos_id]


def _normalize(message: Message) -> Message:
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {"role": message["role"], "content": content or []}
