"""Chat messages from clients, checked before the model's template renders them.

The rendered prompt is plain text, tokenized with special tokens on (the template's own `</s>`, `<s>`
must be), so text a user typed must not contain them: `</s>` in a question became the EOS token and
let a user forge an assistant turn. A special-token string in message text is broken up with a
zero-width space, so it is tokenized as the characters it is. A literal `<image>` in text would be
taken as an image placeholder: refused (send images as image parts). Text that is not valid
Unicode (a lone surrogate from JSON's `\\ud800`) is refused; tokenizers fail on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from llava_serve.common.text import check_unicode
from llava_serve.errors import InvalidRequest
from llava_serve.models.base import IMAGE_PLACEHOLDER

MAX_MESSAGES = 2048
_ZWSP = "\u200b"


class TextGuard:
    def __init__(self, special_tokens: Iterable[str]) -> None:
        tokens = sorted({t for t in special_tokens if len(t) > 1 and t != IMAGE_PLACEHOLDER}, key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None

    def clean(self, text: str, where: str) -> str:
        check_unicode(text, where)
        if IMAGE_PLACEHOLDER in text:
            raise InvalidRequest(
                f"{where}: the text contains {IMAGE_PLACEHOLDER!r}, which marks where an image goes; "
                "send images as image parts"
            )
        if self._special is None:
            return text
        return self._special.sub(lambda m: m[0][0] + _ZWSP + m[0][1:], text)


def special_tokens_of(tokenizer: Any) -> list[str]:
    """Every string the tokenizer turns into a special token."""
    tokens = list(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens += [str(t) for t in decoder.values() if getattr(t, "special", False)]
    return tokens


def checked_messages(messages: list[Any], guard: TextGuard) -> list[dict[str, Any]]:
    """Validated copies of `messages`, their text cleaned by `guard`; InvalidRequest naming the problem."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"{len(messages)} messages; at most {MAX_MESSAGES}")
    return [_message(m, i, guard) for i, m in enumerate(messages)]


def _message(m: Any, i: int, guard: TextGuard) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise InvalidRequest(f"messages[{i}] must be an object with role system, user or assistant")
    content = m.get("content")
    if isinstance(content, str):
        return {**m, "content": guard.clean(content, f"messages[{i}].content")}
    if not isinstance(content, list) or not all(
        isinstance(p, dict) and p.get("type") in ("text", "image", "image_url") for p in content
    ):
        raise InvalidRequest(f"messages[{i}].content must be a string or a list of {{type: text|image}} parts")
    return {**m, "content": [_part(p, f"messages[{i}].content[{j}]", guard) for j, p in enumerate(content)]}


def _part(part: dict[str, Any], where: str, guard: TextGuard) -> dict[str, Any]:
    if part.get("type") != "text":
        return part
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.text must be a string")
    return {**part, "text": guard.clean(text, where)}
