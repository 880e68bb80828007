"""The compiled one-row float32 GEMV (engine/cpu_gemv.py) against F.linear, and the decoder
runner with it against transformers. Compiles the kernel (~40 s the first time on 2 cores; cached
by torch afterwards); skipped only where the kernel cannot be used (no AVX-512, no compiler)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llava_serve.engine import cpu_gemv, decoder_weights
from llava_serve.engine.decoder_runner import DecoderRunner
from llava_serve.engine.engine import BatchEngine
from tests.engine.test_decoder_runner import FAMILIES, drive, prompts, request, tiny_lm

pytestmark = pytest.mark.skipif(cpu_gemv.wanted() is not None, reason=f"GEMV kernel not usable: {cpu_gemv.wanted()}")


@pytest.fixture(scope="module")
def built():
    module = cpu_gemv.kernel()
    assert module is not None, "the kernel should build where wanted() says it can"
    return module


@pytest.mark.parametrize(("out", "inp"), [(4, 16), (37, 1000), (5, 17), (2816, 1024), (1, 3)])
def test_the_kernel_matches_f_linear_on_any_shape(built, out: int, inp: int) -> None:
    gen = torch.Generator().manual_seed(out * 7 + inp)
    w, x, b = (torch.randn(*s, generator=gen) for s in ((out, inp), (1, inp), (out,)))
    torch.testing.assert_close(cpu_gemv.gemv(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cpu_gemv.gemv(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_row_steps_through_the_kernel_match_transformers(built, tokenizer, family, monkeypatch) -> None:
    monkeypatch.setattr(decoder_weights, "GEMV_MIN_BYTES", 0)  # the tiny model is far below it
    lm = tiny_lm(tokenizer, family)
    eng = BatchEngine(lm, max_running=1, max_waiting=8, adapt_threads=False, prefix_cache_bytes=0)
    assert isinstance(eng.runner, DecoderRunner)
    assert eng.runner.forward.w.layers[0].qkv.row_kernel
    calls = 0
    real = cpu_gemv.gemv

    def counted(*args):
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr(cpu_gemv, "gemv", counted)
    reqs = [request(p, n) for p, n in zip(prompts(3, base=6), [7, 5, 9])]
    seen = drive(eng, {0: reqs})
    assert calls > 0
    with torch.inference_mode():
        full = {id(r): lm.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    for req, pos, logits in seen:
        torch.testing.assert_close(logits, full[id(req)][pos], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    from llava_serve.tools.checkpoints.hf import SIZES, build_tokenizer

    return build_tokenizer(SIZES["tiny"].vocab)
