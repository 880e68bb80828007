"""TextAssembler: streamed text is always a prefix of the final text."""

from __future__ import annotations

import pytest

from llava_serve.engine.text import TextAssembler
from llava_serve.models.builder import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(512)


def stream(tok, text: str, stop=()):
    asm = TextAssembler(tok, tuple(stop))
    shown = []
    stopped = False
    for token in tok(text, add_special_tokens=False).input_ids:
        stopped = asm.append(token)
        shown.append(asm.visible())
        if stopped:
            break
    return asm, shown, stopped


def test_multibyte_characters_never_break(tok):
    text = "東京 こんにちは 😀 café"
    asm, shown, _ = stream(tok, text)
    assert all("\ufffd" not in s for s in shown)
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))
    assert asm.visible(final=True) == text


def test_stop_string_split_over_tokens_is_held_back_then_cut(tok):
    asm, shown, stopped = stream(tok, "the red circle is here", stop=["circle is"])
    assert stopped
    assert asm.visible(final=True) == "the red "
    assert all("circ" not in s for s in shown)


def test_partial_stop_that_never_completes_is_released(tok):
    asm, _shown, stopped = stream(tok, "the red cir and more", stop=["circle"])
    assert not stopped
    assert asm.visible(final=True) == "the red cir and more"
