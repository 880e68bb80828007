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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_row_steps_in_one_kernel_call_match_the_layer_by_layer_path(
    built, tokenizer, family, dtype, monkeypatch
) -> None:
    """decode_row (every layer of a one-row step in one call) against the torch ops it replaces, at
    every position of three requests (grouped-query heads; Qwen2's QKV bias), then against
    transformers through the engine. In bfloat16 the kernel keeps the residual stream and its sums
    in float32 where the layer-by-layer path rounds after every op, hence the wider tolerance."""
    monkeypatch.setattr(decoder_weights, "GEMV_MIN_BYTES", 0)
    lm = tiny_lm(tokenizer, family)
    lm.model.to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    eng = BatchEngine(lm, max_running=1, max_waiting=8, adapt_threads=False, prefix_cache_bytes=0)
    forward = eng.runner.forward
    assert forward.row_step is not None
    assert forward.w.heads != forward.w.kv_heads  # the tiny config has grouped-query heads
    calls = 0
    row_step = forward.row_step

    def compared(token, pos, kv, cos, sin):
        nonlocal calls
        calls += 1
        keys = [k.clone() for k in kv.keys]
        values = [v.clone() for v in kv.values]
        forward.row_step = None  # the layer-by-layer path, on copies of the cache
        saved = kv.keys, kv.values
        kv.keys, kv.values = keys, values
        try:
            step = forward._inputs([token], [pos], [])
            x = forward._embed([token], [])
            for layer, k, v in zip(forward.w.layers, keys, values, strict=True):
                x = forward._layer(layer, k, v, x, step)
        finally:
            kv.keys, kv.values = saved
            forward.row_step = compared
        fused = row_step(token, pos, kv, cos, sin)
        assert fused.dtype == dtype
        torch.testing.assert_close(fused, x, **tol)
        for a, b in zip([*kv.keys, *kv.values], [*keys, *values], strict=True):
            torch.testing.assert_close(a[0, :, : pos + 1], b[0, :, : pos + 1], **tol)
        return fused

    forward.row_step = compared
    reqs = [request(p, n) for p, n in zip(prompts(3, base=6), [7, 5, 9])]
    seen = [s for req in reqs for s in drive(eng, {0: [req]})]  # one at a time: decode-only steps
    assert calls == 7 + 5 + 9 - 3  # every step after each prompt's (which samples the first token)
    if dtype != torch.float32:
        return  # transformers' bfloat16 forward rounds like the layer-by-layer path (compared above)
    with torch.inference_mode():
        full = {id(r): lm.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    for req, pos, logits in seen:
        torch.testing.assert_close(logits, full[id(req)][pos], atol=1e-4, rtol=1e-4)


def test_the_row_step_is_not_used_where_the_kernel_cannot_run_the_layers(tokenizer, monkeypatch) -> None:
    """A bias on the output or MLP projections (no kernel support) keeps the layer-by-layer path."""
    monkeypatch.setattr(decoder_weights, "GEMV_MIN_BYTES", 0)
    lm = tiny_lm(tokenizer, "llama", mlp_bias=True)
    eng = BatchEngine(lm, max_running=1, max_waiting=8, adapt_threads=False, prefix_cache_bytes=0)
    assert eng.runner.forward.w.layers[0].qkv.row_kernel
    assert eng.runner.forward.row_step is None


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_the_decode_attention_kernel_equals_sdpa(built, kv_heads) -> None:
    """One query per row over rows of different lengths in a wider cache, grouped-query heads."""
    gen = torch.Generator().manual_seed(kv_heads)
    b, heads, d, cols = 3, 8, 24, 40
    q = torch.randn(b, heads, d, generator=gen)
    keys, values = (torch.randn(b + 1, kv_heads, cols, d, generator=gen) for _ in range(2))
    lengths = torch.tensor([21, 1, 33])
    got = cpu_gemv.attention(q, keys, values, lengths)
    for row in range(b):
        n = int(lengths[row])
        expected = F.scaled_dot_product_attention(
            q[row : row + 1].unsqueeze(2),
            keys[row : row + 1, :, :n],
            values[row : row + 1, :, :n],
            enable_gqa=kv_heads != heads,
        ).reshape(heads * d)
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_gemv.attention(q, keys, values, torch.tensor([21, 0, 33]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_rows_through_the_attention_kernel_match_transformers(built, tokenizer, family, monkeypatch) -> None:
    """Rows joining and leaving (several decode rows a step, prompt chunks beside them) with the
    compiled kernels on: logits equal transformers' at every sampled position."""
    monkeypatch.setattr(decoder_weights, "GEMV_MIN_BYTES", 0)
    lm = tiny_lm(tokenizer, family)
    eng = BatchEngine(lm, max_running=3, max_waiting=8, step_tokens=12, adapt_threads=False, prefix_cache_bytes=0)
    assert eng.runner.forward.kernel_attention
    calls = []
    real = cpu_gemv.attention
    monkeypatch.setattr(cpu_gemv, "attention", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    reqs = [request(p, n) for p, n in zip(prompts(5, base=6), [9, 4, 12, 6, 7])]
    seen = drive(eng, {0: reqs[:2], 3: reqs[2:4], 6: reqs[4:]})
    assert max(calls) == 3
    with torch.inference_mode():
        full = {id(r): lm.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    for req, pos, logits in seen:
        torch.testing.assert_close(logits, full[id(req)][pos], atol=1e-4, rtol=1e-4)
