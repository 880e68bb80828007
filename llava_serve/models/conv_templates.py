"""LLaVA's conversation templates, with the separators LLaVA's `conversation.py` defines.

A template renders OpenAI-style messages the way LLaVA's `Conversation.get_prompt()` renders its
turns: images become `<image>\\n` in front of the text of their message, a `system` message
replaces the template's system prompt, and `add_generation_prompt` appends the assistant role
with no message. `template_for_model` picks the template from the model name as LLaVA's CLI does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from llava_serve.errors import ModelLoadError
from llava_serve.models.base import IMAGE_PLACEHOLDER, Message, PromptBuilder
from llava_serve.models.templates import message_text


class SepStyle(Enum):
    SINGLE = "single"  # role: message<sep> after every turn
    TWO = "two"  # role: message, <sep> after user turns and <sep2> after assistant turns
    MPT = "mpt"  # role already carries its punctuation; <sep> after every turn
    LLAMA_2 = "llama_2"  # [INST] ... [/INST] answer </s>
    PLAIN = "plain"  # messages only, no roles


# None marks the open assistant turn (LLaVA appends `(roles[1], None)` before generating)
Turn = tuple[str, str | None]


@dataclass(frozen=True)
class ConvTemplate:
    name: str
    system: str
    roles: tuple[str, str]
    style: SepStyle
    sep: str
    sep2: str | None = None

    @property
    def stop(self) -> str:
        """The stop string LLaVA's clients send with this template."""
        return self.sep if self.style in (SepStyle.SINGLE, SepStyle.MPT) else (self.sep2 or self.sep)

    def render(self, turns: Sequence[Turn], system: str | None = None) -> str:
        system = self.system if system is None else system
        render = _RENDERERS[self.style]
        return render(self, list(turns), system)


def _single(t: ConvTemplate, turns: list[Turn], system: str) -> str:
    out = system + t.sep
    for role, message in turns:
        out += f"{role}: {message}{t.sep}" if message else f"{role}:"
    return out


def _two(t: ConvTemplate, turns: list[Turn], system: str) -> str:
    seps = (t.sep, t.sep2 or t.sep)
    out = system + seps[0]
    for i, (role, message) in enumerate(turns):
        out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return out


def _mpt(t: ConvTemplate, turns: list[Turn], system: str) -> str:
    out = system + t.sep
    for role, message in turns:
        out += f"{role}{message}{t.sep}" if message else role
    return out


def _llama_2(t: ConvTemplate, turns: list[Turn], system: str) -> str:
    out = ""
    for i, (_, message) in enumerate(turns):
        if not message:
            continue
        if i == 0 and system:
            message = f"<<SYS>>\n{system}\n<</SYS>>\n\n{message}"
        if i % 2 == 0:
            out += f"{t.sep}[INST] {message} [/INST]"
        else:
            out += f" {message} {t.sep2}"
    # LLaVA strips the characters of sep (a str.lstrip character set), not the prefix
    return out.lstrip(t.sep) if t.sep else out


def _plain(t: ConvTemplate, turns: list[Turn], system: str) -> str:
    # LLaVA's plain template has sep2=None and raises on a finished assistant turn; we use sep
    seps = (t.sep, t.sep2 or t.sep)
    out = system
    for i, (_, message) in enumerate(turns):
        if message:
            out += message + seps[i % 2]
    return out


_RENDERERS = {
    SepStyle.SINGLE: _single,
    SepStyle.TWO: _two,
    SepStyle.MPT: _mpt,
    SepStyle.LLAMA_2: _llama_2,
    SepStyle.PLAIN: _plain,
}

_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_MPT_SYSTEM = (
    "<|im_start|>system\n"
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

TEMPLATES: dict[str, ConvTemplate] = {
    t.name: t
    for t in (
        ConvTemplate("llava_v1", _HUMAN_SYSTEM, ("USER", "ASSISTANT"), SepStyle.TWO, " ", "</s>"),
        ConvTemplate("vicuna_v1", _USER_SYSTEM, ("USER", "ASSISTANT"), SepStyle.TWO, " ", "</s>"),
        ConvTemplate("llava_llama_2", _LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), SepStyle.LLAMA_2, "<s>", "</s>"),
        ConvTemplate("mistral_instruct", "", ("USER", "ASSISTANT"), SepStyle.LLAMA_2, "", "</s>"),
        ConvTemplate(
            "chatml_direct",
            "<|im_start|>system\nAnswer the questions.",
            _CHATML_ROLES,
            SepStyle.MPT,
            "<|im_end|>",
        ),
        ConvTemplate("mpt", _MPT_SYSTEM, _CHATML_ROLES, SepStyle.MPT, "<|im_end|>"),
        ConvTemplate("llava_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), SepStyle.SINGLE, "###"),
        ConvTemplate("plain", "", ("", ""), SepStyle.PLAIN, "\n"),
    )
}
# LLaVA's other names for the same templates
ALIASES = {"v1": "vicuna_v1", "mistral_direct": "chatml_direct", "v0_plain": "plain"}


def get_template(name: str) -> ConvTemplate:
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        valid = ", ".join(sorted([*TEMPLATES, *ALIASES]))
        raise ModelLoadError(f"unknown --conv-template {name!r}; valid names: {valid}")
    return TEMPLATES[key]


def template_for_model(model_name: str) -> str:
    """The template LLaVA's CLI picks for a model name (`llava/serve/cli.py`)."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


def llava_model_name(model_path: str) -> str:
    """LLaVA's `get_model_name_from_path`: the folder name, with its parent for `checkpoint-N`."""
    parts = model_path.rstrip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def to_turns(template: ConvTemplate, messages: Sequence[Message]) -> tuple[list[Turn], str | None]:
    """OpenAI-style messages -> (role, text) turns, images as `<image>\\n` before the text."""
    system: str | None = None
    turns: list[Turn] = []
    for message in messages:
        text, n_images = message_text(message)
        if message["role"] == "system":
            system = text
            continue
        role = template.roles[0] if message["role"] == "user" else template.roles[1]
        turns.append((role, (IMAGE_PLACEHOLDER + "\n") * n_images + text))
    return turns, system


def conv_prompt_builder(template: ConvTemplate) -> PromptBuilder:
    def build(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        turns, system = to_turns(template, messages)
        if add_generation_prompt:
            turns.append((template.roles[1], None))
        return template.render(turns, system)

    return build
