"""The FastChat form of a prompt format: it must render, by FastChat's rules, the model's own prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2
import pytest

from llava_serve.models.conv_templates import TEMPLATES, conv_prompt_builder
from llava_serve.models.fastchat_conv import FastChatSepStyle, detect, from_llava_template, render

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + CHATML
)
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' </s><s>' }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def jinja_builder(source: str) -> Any:
    template = jinja2.Template(source)

    def build(messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    return build


CHAT = [("user", "What is in the picture?"), ("assistant", "A red circle."), ("user", "And its size?")]


def fastchat_prompt(conv: Any, system: str | None) -> str:
    turns = [(conv.roles[0] if r == "user" else conv.roles[1], m) for r, m in CHAT]
    return render(conv, [*turns, (conv.roles[1], None)], system)


def messages(system: str | None) -> list[dict[str, Any]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": m} for r, m in CHAT]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_every_llava_template_maps_to_the_same_prompt(name: str, system: str | None) -> None:
    conv = from_llava_template(TEMPLATES[name])
    assert conv is not None
    assert fastchat_prompt(conv, system) == conv_prompt_builder(TEMPLATES[name])(messages(system), True)


@pytest.mark.parametrize(
    ("source", "style"),
    [
        (CHATML_WITH_DEFAULT_SYSTEM, FastChatSepStyle.CHATML),
        (LLAMA_2, FastChatSepStyle.LLAMA2),
    ],
)
@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_chat_templates_recognised_render_the_same_prompt(
    source: str, style: FastChatSepStyle, system: str | None
) -> None:
    build = jinja_builder(source)
    conv = detect(build)
    assert conv is not None and conv.sep_style == style
    assert fastchat_prompt(conv, system) == build(messages(system), True)


def test_vicuna_style_chat_template_recognised_with_its_stop() -> None:
    conv = detect(conv_prompt_builder(TEMPLATES["vicuna_v1"]))
    assert conv is not None and conv.sep_style == FastChatSepStyle.ADD_COLON_TWO
    assert (conv.sep, conv.sep2, conv.stop_str, conv.roles) == (" ", "</s>", "</s>", ("USER", "ASSISTANT"))


@pytest.mark.parametrize("source", [GEMMA, CHATML])  # ChatML with no default system: FastChat always writes one
def test_formats_fastchat_cannot_express_get_none(source: str) -> None:
    assert detect(jinja_builder(source)) is None


def test_a_template_that_refuses_the_probe_gets_none() -> None:
    assert detect(jinja_builder("{{ raise_exception('system first') if messages[0]['role'] != 'system' }}")) is None


def test_wire_shape_is_fastchats_dataclass() -> None:
    wire = from_llava_template(TEMPLATES["llava_v1"], [2]).wire()  # type: ignore[union-attr]
    assert set(wire) == {
        "name", "system_template", "system_message", "roles", "messages", "offset",
        "sep_style", "sep", "sep2", "stop_str", "stop_token_ids",
    }  # fmt: skip
    assert wire["sep_style"] == 2 and wire["stop_token_ids"] == [2] and wire["messages"] == []
