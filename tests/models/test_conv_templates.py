"""LLaVA's conversation templates: the exact strings LLaVA's Conversation.get_prompt() builds.

The expected strings were written out by hand from LLaVA's `conversation.py` (templates and
separator rules) for one conversation: an image with a question, an answer, a second question,
then the open assistant turn LLaVA appends before generating.
"""

from __future__ import annotations

import pytest

from llava_serve.errors import ModelLoadError
from llava_serve.models.conv_templates import (
    TEMPLATES,
    conv_prompt_builder,
    get_template,
    llava_model_name,
    template_for_model,
)

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "What colour is it?"},
]
HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_2_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
EXPECTED = {
    "llava_v1": HUMAN
    + " USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>USER: What colour is it? ASSISTANT:",
    "vicuna_v1": USER_SYS
    + " USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>USER: What colour is it? ASSISTANT:",
    "llava_llama_2": (
        f"[INST] <<SYS>>\n{LLAMA_2_SYS}\n<</SYS>>\n\n<image>\nWhat is shown? [/INST] A red circle. </s>"
        "<s>[INST] What colour is it? [/INST]"
    ),
    "mistral_instruct": "[INST] <image>\nWhat is shown? [/INST] A red circle. </s>[INST] What colour is it? [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|>"
        "<|im_start|>user\nWhat colour is it?<|im_end|>"
        "<|im_start|>assistant\n"
    ),
    "mpt": (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|>"
        "<|im_start|>user\nWhat colour is it?<|im_end|>"
        "<|im_start|>assistant\n"
    ),
    "llava_v0": HUMAN
    + "###Human: <image>\nWhat is shown?###Assistant: A red circle.###Human: What colour is it?###Assistant:",
    # LLaVA's plain has sep2=None and raises on a finished assistant turn; ours ends it with sep
    "plain": "<image>\nWhat is shown?\nA red circle.\nWhat colour is it?\n",
}


def test_every_template_is_covered():
    assert set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turn_conversation_with_an_image(name):
    assert conv_prompt_builder(get_template(name))(CONVERSATION, True) == EXPECTED[name]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llava_v1", HUMAN + " USER: <image>\n<image>\nCompare. ASSISTANT:"),
        ("llava_llama_2", f"[INST] <<SYS>>\n{LLAMA_2_SYS}\n<</SYS>>\n\n<image>\n<image>\nCompare. [/INST]"),
        (
            "chatml_direct",
            "<|im_start|>system\nAnswer the questions.<|im_end|>"
            "<|im_start|>user\n<image>\n<image>\nCompare.<|im_end|><|im_start|>assistant\n",
        ),
        ("llava_v0", HUMAN + "###Human: <image>\n<image>\nCompare.###Assistant:"),
    ],
)
def test_one_turn_two_images(name, expected):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}
    ]
    assert conv_prompt_builder(get_template(name))(messages, True) == expected


def test_without_generation_prompt_the_conversation_ends_after_the_last_turn():
    build = conv_prompt_builder(get_template("llava_v1"))
    assert build(CONVERSATION[:2], False) == HUMAN + " USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>"


def test_system_message_replaces_the_template_system():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert conv_prompt_builder(get_template("llava_v1"))(messages, True) == "Be brief. USER: Hi ASSISTANT:"
    assert conv_prompt_builder(get_template("llava_llama_2"))(messages, True) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    )


@pytest.mark.parametrize(
    ("model_name", "template"),
    [
        ("llava-v1.5-7b", "llava_v1"),
        ("llava-v1.5-13b-lora", "llava_v1"),
        ("llava-v1.6-vicuna-7b", "llava_v1"),
        ("llava-v1.6-mistral-7b", "mistral_instruct"),
        ("llava-v1.6-34b", "chatml_direct"),
        ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
        ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
        ("LLaVA-7b-delta-v0", "llava_v0"),
        ("my-model", "llava_v0"),
    ],
)
def test_template_from_model_name_as_llava_cli(model_name, template):
    assert template_for_model(model_name) == template


def test_model_name_from_path_as_llava():
    assert llava_model_name("/ckpts/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert llava_model_name("/ckpts/llava-v1.5-7b/checkpoint-500") == "llava-v1.5-7b_checkpoint-500"


def test_aliases_and_stop_strings():
    assert get_template("v1") is get_template("vicuna_v1")
    assert get_template("mistral_direct") is get_template("chatml_direct")
    stops = {name: t.stop for name, t in TEMPLATES.items()}
    assert stops["llava_v1"] == "</s>" and stops["llava_v0"] == "###" and stops["chatml_direct"] == "<|im_end|>"


def test_unknown_template_lists_valid_names():
    with pytest.raises(ModelLoadError) as err:
        get_template("vicuna_v9")
    message = str(err.value)
    assert "vicuna_v9" in message
    for name in TEMPLATES:
        assert name in message
