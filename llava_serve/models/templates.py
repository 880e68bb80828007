"""Prompt text helpers shared by loaders: message flattening and a Vicuna fallback."""

from __future__ import annotations

from collections.abc import Sequence

from llava_serve.models.base import IMAGE_PLACEHOLDER, Message

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# HF-style jinja chat template producing LLaVA's vicuna_v1 format; content parts may be images.
VICUNA_CHAT_TEMPLATE = (
    '{% set ns = namespace(sys="' + VICUNA_SYSTEM + '") %}'
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.sys = m['content'] if m['content'] is string else m['content'][0]['text'] %}"
    "{% endif %}{% endfor %}"
    "{{ ns.sys }}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ ' USER: ' if m['role'] == 'user' else ' ASSISTANT: ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if m['role'] == 'assistant' %}</s>{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def message_text(message: Message) -> tuple[str, int]:
    """The text of one message and how many images it carries (images first, as LLaVA puts them)."""
    content = message.get("content")
    if isinstance(content, str):
        return content, 0
    texts = [part.get("text", "") for part in content or [] if part.get("type") == "text"]
    n_images = sum(1 for part in content or [] if part.get("type") in ("image", "image_url"))
    return "\n".join(texts), n_images


def fallback_prompt(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Vicuna v1 format, for checkpoints that ship no chat template."""
    system = VICUNA_SYSTEM
    parts: list[str] = []
    for message in messages:
        text, n_images = message_text(message)
        if message["role"] == "system":
            system = text
            continue
        text = (IMAGE_PLACEHOLDER + "\n") * n_images + text
        if message["role"] == "user":
            parts.append(f" USER: {text}")
        else:
            parts.append(f" ASSISTANT: {text}</s>")
    if add_generation_prompt:
        parts.append(" ASSISTANT:")
    return system + "".join(parts)
