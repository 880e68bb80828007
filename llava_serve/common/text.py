"""Text from clients that cannot be encoded: JSON's `\\ud800` decodes to a lone surrogate, which
UTF-8 (and every tokenizer, and httpx when it forwards the text) refuses."""

from __future__ import annotations

from llava_serve.errors import InvalidRequest


def check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{where}: the text is not valid Unicode (a lone surrogate)") from None
