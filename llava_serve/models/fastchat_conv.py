"""The model's prompt format as a FastChat `Conversation` (what `/worker_get_conv_template` answers).

FastChat's API server builds the prompt itself from that conversation (`Conversation.get_prompt`), so
the conversation must render, by FastChat's rules, exactly what the model's own template renders.
LLaVA's templates map one to one. A jinja chat template is recognised by rendering probe
conversations and matching the vicuna (`USER: ... ASSISTANT:`), ChatML and Llama-2 (`[INST]`)
layouts; each candidate is accepted only if `render` gives the template's text for every probe.
Anything else has no FastChat form and gets None (docs/compatibility.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from typing import Any

from llava_serve.models.base import LoadedModel, Message
from llava_serve.models.conv_templates import TEMPLATES, ConvTemplate, SepStyle


class FastChatSepStyle(IntEnum):
    """The numbers of FastChat's `SeparatorStyle` (fastchat/conversation.py, 0.2.36) that we emit."""

    ADD_COLON_TWO = 2  # the only style FastChat's API server can put images into
    NO_COLON_SINGLE = 4
    LLAMA2 = 7
    CHATML = 9


@dataclass(frozen=True)
class FastChatConv:
    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep_style: FastChatSepStyle
    sep: str
    sep2: str | None = None
    stop_str: str | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        """FastChat's dataclass as its worker serialises it: the style as its integer, no messages yet."""
        body = asdict(self)
        return {**body, "roles": list(self.roles), "sep_style": int(self.sep_style), "messages": [], "offset": 0}


# (role, text or None for the open assistant turn)
Turn = tuple[str, str | None]


def render(conv: FastChatConv, turns: Sequence[Turn], system: str | None = None) -> str:
    """The prompt FastChat's `Conversation.get_prompt` builds for these turns (the styles above)."""
    message = conv.system_message if system is None else system
    head = conv.system_template.format(system_message=message)
    style, seps = conv.sep_style, (conv.sep, conv.sep2 if conv.sep2 is not None else conv.sep)
    if style == FastChatSepStyle.ADD_COLON_TWO:
        body = "".join(f"{r}: {m}{seps[i % 2]}" if m else f"{r}:" for i, (r, m) in enumerate(turns))
        return head + conv.sep + body
    if style == FastChatSepStyle.NO_COLON_SINGLE:
        return head + "".join(f"{r}{m}{conv.sep}" if m else r for r, m in turns)
    if style == FastChatSepStyle.CHATML:
        out = "" if head == "" else head + conv.sep + "\n"
        return out + "".join(f"{r}\n{m}{conv.sep}\n" if m else f"{r}\n" for r, m in turns)
    out = head if message else "[INST] "  # LLAMA2
    for i, (_, m) in enumerate(turns):
        tag = conv.roles[i % 2]
        out += (m + " " if i == 0 else f"{tag} {m}{seps[i % 2]}") if m else tag
    return out


def from_llava_template(t: ConvTemplate, stop_token_ids: Sequence[int] = ()) -> FastChatConv | None:
    """One of LLaVA's conversation templates in FastChat's form (the same prompt, turn for turn)."""
    ids = list(stop_token_ids)
    if t.style in (SepStyle.TWO, SepStyle.SINGLE):
        sep2 = t.sep2 if t.style == SepStyle.TWO else t.sep
        return FastChatConv(
            t.name,
            "{system_message}",
            t.system,
            t.roles,
            FastChatSepStyle.ADD_COLON_TWO,
            t.sep,
            sep2,
            _stop(t.stop),
            ids,
        )
    if t.style == SepStyle.MPT:  # system + sep, then role + message + sep
        return FastChatConv(
            t.name,
            "{system_message}" + t.sep,
            t.system,
            t.roles,
            FastChatSepStyle.NO_COLON_SINGLE,
            t.sep,
            None,
            _stop(t.stop),
            ids,
        )
    if t.style == SepStyle.PLAIN:
        return FastChatConv(
            t.name, "{system_message}", t.system, ("", ""), FastChatSepStyle.NO_COLON_SINGLE, t.sep, None, None, ids
        )
    if t.style == SepStyle.LLAMA_2:
        system_template = "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n"
        return FastChatConv(
            t.name,
            system_template,
            t.system,
            ("[INST]", "[/INST]"),
            FastChatSepStyle.LLAMA2,
            " ",
            f" {t.sep2}{t.sep}",
            _stop(t.sep2 or ""),
            ids,
        )
    return None


def _stop(s: str) -> str | None:
    return s.strip() or None  # a whitespace separator is no stop (LLaVA only trims it)


# probe texts: plain words no template rewrites, unlikely to occur in a template's own text
_SYS, _U1, _A1, _U2 = "Qsysprobe", "Qfirstprobe", "Qanswerprobe", "Qsecondprobe"
_PROBES: list[tuple[str | None, list[Turn]]] = [
    (None, [("user", _U1), ("assistant", _A1), ("user", _U2)]),
    (_SYS, [("user", _U1), ("assistant", _A1), ("user", _U2)]),
    (None, [("user", _U1)]),
    (_SYS, [("user", _U1)]),
]
Build = Callable[[Sequence[Message], bool], str]


def detect(build: Build, name: str = "hf-chat-template", stop_token_ids: Sequence[int] = ()) -> FastChatConv | None:
    """The FastChat form of a chat template, or None when none of the known layouts reproduces it."""
    try:
        plain = build(_messages(None, _PROBES[0][1]), True)
    except Exception:  # a template that refuses the probe (say, one that insists on a system turn)
        return None
    for candidate in (_vicuna(plain), _chatml(plain), _llama2(plain)):
        if candidate is not None:
            conv = replace(candidate, name=name, stop_token_ids=list(stop_token_ids))
            if _reproduces(conv, build):
                return conv
    return None


def _messages(system: str | None, turns: list[Turn]) -> list[Message]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": r, "content": m} for r, m in turns]


def _reproduces(conv: FastChatConv, build: Build) -> bool:
    for system, turns in _PROBES:
        roles = [(conv.roles[0] if r == "user" else conv.roles[1], m) for r, m in turns]
        try:
            expected = build(_messages(system, turns), True)
        except Exception:
            return False
        if render(conv, [*roles, (conv.roles[1], None)], system) != expected:
            return False
    return True


def _vicuna(text: str) -> FastChatConv | None:
    pattern = (
        rf"(?P<sys>.*?)(?P<sep>\s*)(?P<r0>\w+): {_U1}(?P=sep)(?P<r1>\w+): {_A1}(?P<sep2>.*?)"
        rf"(?P=r0): {_U2}(?P=sep)(?P=r1):"
    )
    m = re.fullmatch(pattern, text, re.DOTALL)
    if m is None:
        return None
    style = FastChatSepStyle.ADD_COLON_TWO
    return FastChatConv(
        "", "{system_message}", m["sys"], (m["r0"], m["r1"]), style, m["sep"], m["sep2"], _stop(m["sep2"])
    )


def _chatml(text: str) -> FastChatConv | None:
    s, e = "<|im_start|>", "<|im_end|>"
    pattern = (
        rf"(?:{re.escape(s)}system\n(?P<sys>.*?){re.escape(e)}\n)?{re.escape(s)}user\n{_U1}{re.escape(e)}\n"
        rf"{re.escape(s)}assistant\n{_A1}{re.escape(e)}\n{re.escape(s)}user\n{_U2}{re.escape(e)}\n"
        rf"{re.escape(s)}assistant\n"
    )
    m = re.fullmatch(pattern, text, re.DOTALL)
    if m is None:
        return None
    roles = (f"{s}user", f"{s}assistant")
    return FastChatConv(
        "", f"{s}system\n{{system_message}}", m["sys"] or "", roles, FastChatSepStyle.CHATML, e, None, e
    )


def _llama2(text: str) -> FastChatConv | None:
    pattern = (
        rf"\[INST\] (?:<<SYS>>\n(?P<sys>.*?)\n<</SYS>>\n\n)?{_U1} \[/INST\] {_A1}(?P<sep2>.*?)"
        rf"\[INST\] {_U2} \[/INST\]"
    )
    m = re.fullmatch(pattern, text, re.DOTALL)
    if m is None:
        return None
    system_template = "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n"
    return FastChatConv(
        "",
        system_template,
        m["sys"] or "",
        ("[INST]", "[/INST]"),
        FastChatSepStyle.LLAMA2,
        " ",
        m["sep2"],
        _stop(m["sep2"].split("<s>")[0]),
    )


def conversation_of(lm: LoadedModel) -> FastChatConv | None:
    """The FastChat form of the model's prompt format: LLaVA's template, or its chat template recognised."""
    stop_ids = list(lm.eos_token_ids)
    if lm.template_name in TEMPLATES:
        return from_llava_template(TEMPLATES[lm.template_name], stop_ids)
    return detect(lm.build_prompt, lm.template_name, stop_ids)
