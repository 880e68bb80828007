"""TextAssembler with byte-fallback (Llama-2 / SentencePiece-style) tokenizers and stray byte runs.

Their decoder turns every byte of a run that is not valid UTF-8 into U+FFFD, bytes already shown included;
the text shown must still only grow, and keep growing (issue 17, item 8).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llava_serve.engine.text import MAX_PENDING, TextAssembler
from tests.engine.test_text import sentencepiece_like

TOK = sentencepiece_like(cleanup=False)
BYTES = [TOK.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
# pieces that decode to some text even at the start (no specials, which are skipped, nor a lone "▁")
PLAIN = [i for i in range(3, len(TOK)) if not TOK.convert_ids_to_tokens(i).startswith("<0x") and TOK.decode([i])]
token = st.one_of(st.sampled_from(BYTES), st.sampled_from(PLAIN))


def run(ids: list[int]) -> tuple[TextAssembler, list[str]]:
    asm, shown = TextAssembler(TOK), []
    for t in ids:
        asm.append(t)
        shown.append(asm.visible())
    shown.append(asm.visible(final=True))
    return asm, shown


@settings(max_examples=300, deadline=None)
@given(st.lists(token, max_size=40))
def test_shown_text_only_grows_and_keeps_growing(ids):
    _, shown = run(ids)
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:])), shown
    # at most MAX_PENDING - 1 tokens wait, so every MAX_PENDING tokens some text is added
    for i in range(MAX_PENDING - 1, len(ids)):
        earlier = shown[i - MAX_PENDING] if i >= MAX_PENDING else ""
        assert len(shown[i]) > len(earlier), (ids, shown)
    pieces = [TOK.decode([t]) for t in ids if t in PLAIN]
    assert all(p.strip() in shown[-1] for p in pieces)  # every piece made it into the final text


def test_invalid_run_after_shown_character_does_not_rewrite_it():
    e_acute = [BYTES[0xC3], BYTES[0xA9]]
    stray = [BYTES[0xE3], BYTES[0x41]]  # 0xE3 expects continuation bytes; 0x41 is not one
    the = TOK.convert_tokens_to_ids("▁the")
    _, shown = run([the, *e_acute, *stray, the])
    assert shown[2] == "the\u00e9"  # é shown once its two bytes are in
    assert shown[-1].startswith("the\u00e9") and shown[-1].endswith(" the")
    assert TOK.decode([the, *e_acute, *stray, the]).startswith("the\ufffd")  # what the decoder alone would show


def test_a_long_invalid_run_is_shown_as_it_comes():
    ids = [BYTES[0xE3]] * 12
    _, shown = run(ids)
    assert len(shown[-2]) >= 12 - MAX_PENDING and shown[-1] == "\ufffd" * 12
