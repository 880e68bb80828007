"""`build-model --image-size/--patch-size`: a random checkpoint with another vision geometry (e.g.
LLaVA-1.5's 576 image tokens on the bench decoder, for benchmarks/multiturn_ttft.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.tools.checkpoints.build import main


def test_a_checkpoint_with_its_own_image_geometry_loads_and_counts_its_image_tokens(tmp_path: Path) -> None:
    out = tmp_path / "llava-64px"
    assert (
        main(["--kind", "llava", "--size", "tiny", "--out", str(out), "--image-size", "64", "--patch-size", "8"]) == 0
    )
    lm = load_model(LoadOptions(model_path=str(out), device="cpu"))
    prompt = lm.build_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])
    encoded = lm.encode(prompt, [Image.new("RGB", (40, 90), (200, 10, 10))], ["red"])
    image_token = lm.tokenizer.convert_tokens_to_ids("<image>")
    assert encoded.input_ids.count(image_token) == (64 // 8) ** 2  # the tiny size's own geometry gives 16


def test_an_image_size_that_is_not_a_multiple_of_the_patch_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--kind",
                "llava",
                "--size",
                "tiny",
                "--out",
                str(tmp_path / "x"),
                "--image-size",
                "30",
                "--patch-size",
                "8",
            ]
        )
    assert exit_info.value.code == 2 and "not a multiple of patch size 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_padded_vocabulary_reaches_its_size_and_its_extra_tokens_decode_to_text() -> None:
    """The `1b` size pads the BPE's ~570 tokens to 32000 with unused ones (so lm_head has a real
    size); a random model samples them, so they must decode to text, not vanish as special tokens."""
    from llava_serve.tools.checkpoints.hf import SIZES, build_tokenizer

    assert SIZES["1b"].pad_vocab and not SIZES["bench"].pad_vocab  # the bench checkpoint keeps its vocabulary
    plain = build_tokenizer(1200)
    padded = build_tokenizer(1200, pad=True)
    assert len(plain) < 1200 == len(padded)
    extra = len(padded) - 1
    assert padded.decode([extra], skip_special_tokens=True) == f"<extra_{extra - len(plain)}>"
    assert padded("a cat")["input_ids"] == plain("a cat")["input_ids"]  # text encodes as before
