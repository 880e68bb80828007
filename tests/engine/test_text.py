"""TextAssembler: streamed text is always a prefix of the final text."""

from __future__ import annotations

import pytest

from llava_serve.engine.text import TextAssembler
from llava_serve.tools.checkpoints.hf import build_tokenizer


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


def sentencepiece_like(cleanup: bool):
    """A Llama-style tokenizer (Metaspace pieces, byte fallback, the first piece's space stripped)
    with a hand-made vocabulary: enough to decode any id sequence."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    pieces += ["▁", "▁the", "▁red", "▁circle", "▁.", ".", ",", "▁,", "s", "ing", "▁'", "'s", "n't", "▁n't"]
    pieces += ["é", "東", "京", "▁こんにちは", "!", "▁?", "?", "ab", "▁▁", "\n", "▁\n"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True,
                               unk_token="<unk>"))  # fmt: skip
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=cleanup)  # fmt: skip


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece", "sentencepiece + clean-up"])
def test_windowed_decode_equals_decoding_everything(tok, kind):
    """Random outputs: after every token, the assembled text is what decoding the whole output
    gives, whenever that does not end in half a character; the final text always is. Byte-level
    BPE: any ids (stray bytes, split characters, special tokens). SentencePiece: pieces, special
    tokens, and characters spelled in byte tokens, whole (its byte fallback turns every byte of an
    invalid run into U+FFFD, earlier ones too, so an invalid run can change text already shown;
    real models spell characters, not stray bytes)."""
    import random

    tokenizer = {"byte-level BPE": tok}.get(kind) or sentencepiece_like(cleanup=kind.endswith("clean-up"))
    rng = random.Random(5)
    spelled = [[tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in c.encode()] for c in "東😀é+ ?"]
    plain = [i for i in range(len(tokenizer)) if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    for _ in range(60):
        asm, ids = TextAssembler(tokenizer), []
        for _ in range(rng.randint(1, 40)):
            if kind == "byte-level BPE":
                tokens = [rng.randrange(len(tokenizer))]
            else:
                tokens = rng.choice(spelled) if rng.random() < 0.4 else [rng.choice(plain)]
            for token in tokens:
                ids.append(token)
                asm.append(token)
                full = tokenizer.decode(ids, skip_special_tokens=True)
                if not full.endswith("\ufffd"):  # (mid-character, byte fallback shows earlier bytes as U+FFFD too)
                    assert asm.text == full, (ids, asm.text, full)
                    assert full.startswith(asm.visible()), (ids, asm.visible(), full)
        assert asm.visible(final=True) == tokenizer.decode(ids, skip_special_tokens=True)
