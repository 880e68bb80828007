"""The compiled one-row float32 GEMV (engine/cpu_gemv.py) against F.linear, and the decoder
runner with it against transformers. Compiles the kernel (~40 s the first time on 2 cores; cached
by torch afterwards); skipped only where the kernel cannot be used (no AVX-512, no compiler)."""

from __future__ import annotations

import shutil
from pathlib import Path

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8", "int4"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_row_steps_in_one_kernel_call_match_the_layer_by_layer_path(
    built, tokenizer, family, dtype, monkeypatch
) -> None:
    """decode_row (every layer of a one-row step in one call) against the torch ops it replaces, at
    every position of three requests (grouped-query heads; Qwen2's QKV bias), then against
    transformers through the engine. In bfloat16 the kernel keeps the residual stream and its sums
    in float32 where the layer-by-layer path rounds after every op, hence the wider tolerance. With
    int8 or int4 weights both paths quantize each linear's input the same way (q_linear)."""
    if isinstance(dtype, str) and cpu_gemv.quantized_unavailable():
        pytest.skip(f"{dtype} weights: {cpu_gemv.quantized_unavailable()}")
    monkeypatch.setattr(decoder_weights, "GEMV_MIN_BYTES", 0)
    lm = tiny_lm(tokenizer, family)
    quantization = dtype if isinstance(dtype, str) else None
    dtype = torch.float32 if quantization else dtype
    lm.model.to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    eng = BatchEngine(
        lm, max_running=1, max_waiting=8, adapt_threads=False, prefix_cache_bytes=0, quantization=quantization
    )
    forward = eng.runner.forward
    assert forward.row_step is not None
    assert forward.w.quantization == quantization
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

    compared.rows = row_step.rows  # type: ignore[attr-defined]  # int8/int4 prompt steps: one call too
    forward.row_step = compared
    reqs = [request(p, n) for p, n in zip(prompts(3, base=6), [7, 5, 9])]
    seen = [s for req in reqs for s in drive(eng, {0: [req]})]  # one at a time: decode-only steps
    assert calls == 7 + 5 + 9 - 3  # every step after each prompt's (which samples the first token)
    if dtype != torch.float32 or quantization:
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_rows_through_the_attention_kernel_match_transformers(built, tokenizer, family, monkeypatch) -> None:
    """Rows joining and leaving (several decode rows a step, prompt chunks beside them) with the
    compiled kernels on: logits equal transformers' at every sampled position."""
    monkeypatch.setattr(decoder_weights, "GEMV_MIN_BYTES", 0)
    lm = tiny_lm(tokenizer, family)
    eng = BatchEngine(lm, max_running=3, max_waiting=8, step_tokens=12, adapt_threads=False, prefix_cache_bytes=0)
    assert eng.runner.forward.kernel_attention
    calls = []
    real = cpu_gemv.decode_rows_attention
    monkeypatch.setattr(cpu_gemv, "decode_rows_attention", lambda qkv, *a: calls.append(qkv.shape[0]) or real(qkv, *a))
    reqs = [request(p, n) for p, n in zip(prompts(5, base=6), [9, 4, 12, 6, 7])]
    seen = drive(eng, {0: reqs[:2], 3: reqs[2:4], 6: reqs[4:]})
    assert max(calls) == 3
    with torch.inference_mode():
        full = {id(r): lm.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    for req, pos, logits in seen:
        torch.testing.assert_close(logits, full[id(req)][pos], atol=1e-4, rtol=1e-4)


int8 = pytest.mark.skipif(
    cpu_gemv.wanted() is None and cpu_gemv.quantized_unavailable() is not None,
    reason=f"int8 / int4 weights: {cpu_gemv.wanted() or cpu_gemv.quantized_unavailable()}",
)
KINDS = pytest.mark.parametrize("kind", ["int8", "int4"])


def quantized_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as q_linear sees it: each row's groups of `group` inputs scaled to [-127, 127] and rounded
    (half to even), then scaled back."""
    g = x.view(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, (g * (127 / amax)).round().clamp(-127, 127), torch.zeros_like(g))
    return (q * torch.where(amax > 0, amax / 127, torch.ones_like(amax))).view_as(x)


@int8
@pytest.mark.parametrize(("out", "inp", "rows", "group"), [(96, 128, 1, 128), (37, 96, 7, 32), (70, 64, 13, 64)])
def test_int8_linear_is_the_int8_weight_times_the_row_quantized_input(built, out, inp, rows, group) -> None:
    """q_linear against the same arithmetic in torch: the packed weight dequantized, the input
    quantized per row in groups (128, 64 or 32 wide, the largest that divides the width); outputs
    not a multiple of 32 (padding), rows not a multiple of the kernel's six."""
    gen = torch.Generator().manual_seed(out + inp)
    w, b = torch.randn(out, inp, generator=gen), torch.randn(out, generator=gen)
    x = torch.randn(rows, inp, generator=gen) * torch.linspace(0.1, 4, inp)  # uneven ranges across groups
    x[0, :group] = 0  # an all-zero group
    packed, scale = cpu_gemv.q8_pack(w)
    dequantized = cpu_gemv.q8_dequantize(packed, scale)
    assert (dequantized - w).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest
    expected = F.linear(quantized_rows(x, group), dequantized, b)
    got = cpu_gemv.q_linear(x, packed, scale, out, b)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # and it is a usable approximation of the float layer (~1% of the output's range)
    assert (got - F.linear(x, w, b)).abs().max() < 0.02 * F.linear(x, w, b).abs().max()


def q4_reference(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's q4_0 rounding of w [N, K], written plainly: per group of 32, d = the value of largest
    magnitude / -8 (as float16), q = round(w / d) + 8 clamped to 0..15, back to (q - 8) * d."""
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        for g in range(0, w.shape[1], 32):
            group = w[n, g : g + 32]
            d = float(torch.tensor(float(group[group.abs().argmax()]) / -8).half()) or 1.0
            out[n, g : g + 32] = ((group / d).round() + 8).clamp(0, 15).sub(8) * d
    return out


@int8
@pytest.mark.parametrize(("out", "inp", "rows"), [(96, 128, 1), (37, 96, 7), (70, 64, 13), (33, 256, 6)])
def test_int4_linear_is_the_int4_weight_times_the_row_quantized_input(built, out, inp, rows) -> None:
    """q_linear with a q4_pack weight against the same arithmetic in torch: the weight as q4_0 rounds
    it (groups of 32 inputs), the input quantized per row in groups of 32; outputs not a multiple of
    32 (padding), rows not a multiple of the kernel's six, an all-zero weight group."""
    gen = torch.Generator().manual_seed(out * 3 + inp)
    w, b = torch.randn(out, inp, generator=gen), torch.randn(out, generator=gen)
    w[1, 32:64] = 0
    x = torch.randn(rows, inp, generator=gen) * torch.linspace(0.1, 4, inp)
    x[0, :32] = 0
    packed, scale = cpu_gemv.q4_pack(w)
    assert packed.numel() == (out + 31) // 32 * 32 * inp // 2  # two weights a byte
    dequantized = cpu_gemv.q4_dequantize(packed, scale, out)
    torch.testing.assert_close(dequantized, q4_reference(w), atol=1e-6, rtol=1e-6)
    expected = F.linear(quantized_rows(x, 32), dequantized, b)
    got = cpu_gemv.q_linear(x, packed, scale, out, b)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # 4 bits on Gaussian weights: within ~15% of the float layer's output range (q4_0's error)
    assert (got - F.linear(x, w, b)).abs().max() < 0.15 * F.linear(x, w, b).abs().max()


@int8
@KINDS
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_integer_engine_tracks_the_float_model_and_frees_its_float_weights(built, tokenizer, family, kind) -> None:
    """The batch engine with int8 or int4 weights (several rows a step, prompt chunks beside them):
    logits stay near transformers' float32 ones at every sampled position (int8 within 2% of their
    range, int4 within 10%), the decoder's float layer weights are gone from the transformers modules
    (meta tensors), lm_head is int8 (its float copy gone too, these models' embeddings being their own)."""
    reference = tiny_lm(tokenizer, family)
    lm = tiny_lm(tokenizer, family)
    eng = BatchEngine(
        lm, max_running=3, max_waiting=8, step_tokens=12, adapt_threads=False, prefix_cache_bytes=0, quantization=kind
    )
    w = eng.runner.forward.w
    assert w.quantization == kind and w.layers[0].qkv.weight.dtype == torch.uint8
    assert w.lm_head.weight.dtype == torch.uint8 and w.lm_head.scale.dtype == torch.float32  # int8 per channel
    layer = lm.model.model.layers[0]
    assert layer.self_attn.q_proj.weight.is_meta and layer.mlp.down_proj.weight.is_meta
    assert lm.model.lm_head.weight.is_meta and not lm.model.get_input_embeddings().weight.is_meta
    reqs = [request(p, n) for p, n in zip(prompts(4, base=6), [9, 4, 12, 6])]
    seen = drive(eng, {0: reqs[:2], 3: reqs[2:]})
    with torch.inference_mode():
        full = {id(r): reference.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    worst = max(float((got - full[id(r)][pos]).abs().max() / full[id(r)][pos].abs().max()) for r, pos, got in seen)
    bound = 0.02 if kind == "int8" else 0.10
    assert worst < bound, f"{kind} logits are {worst:.1%} of the logits' range away from float32"


@int8
def test_a_tied_lm_head_is_quantized_and_the_embeddings_keep_their_floats(built, tokenizer) -> None:
    """With tied input and output embeddings, lm_head becomes int8 and the float matrix stays, as the
    embeddings it is; logits still track float32."""
    reference = tiny_lm(tokenizer, "llama", tie_word_embeddings=True)
    reference.model.tie_weights()
    lm = tiny_lm(tokenizer, "llama", tie_word_embeddings=True)
    lm.model.tie_weights()
    assert lm.model.lm_head.weight.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    eng = BatchEngine(lm, max_running=2, max_waiting=4, adapt_threads=False, prefix_cache_bytes=0, quantization="int8")
    w = eng.runner.forward.w
    assert w.lm_head.weight.dtype == torch.uint8 and not lm.model.lm_head.weight.is_meta
    torch.testing.assert_close(w.embed, reference.model.get_input_embeddings().weight)
    reqs = [request(p, 5) for p in prompts(2, base=6)]
    seen = drive(eng, {0: reqs})
    with torch.inference_mode():
        full = {id(r): reference.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    worst = max(float((got - full[id(r)][pos]).abs().max() / full[id(r)][pos].abs().max()) for r, pos, got in seen)
    assert worst < 0.02


@int8
@KINDS
def test_integer_weights_are_refused_where_they_cannot_run(tokenizer, kind) -> None:
    """The transformers runner, a model another engine has taken the floats of, a config flag
    combination: clear errors, no engine."""
    from llava_serve.engine.runners import build_runner
    from llava_serve.errors import ModelLoadError
    from llava_serve.worker.config import WorkerConfig

    lm = tiny_lm(tokenizer, "llama")
    build_runner(lm, 2, quantization=kind)
    with pytest.raises(ModelLoadError, match="taken its float weights"):
        build_runner(lm, 2, quantization=kind)
    with pytest.raises(ModelLoadError, match="decoder runner"):
        build_runner(tiny_lm(tokenizer, "llama"), 2, kind="transformers", quantization=kind)
    with pytest.raises(ValueError, match="batch engine"):
        WorkerConfig(quantization=kind, engine="generate")
    with pytest.raises(ValueError, match="exclusive"):
        WorkerConfig(quantization=kind, load_4bit=True)
    with pytest.raises(ValueError, match="float32"):
        WorkerConfig(quantization=kind, dtype="bfloat16")
    with pytest.raises(ValueError, match="CPU"):
        WorkerConfig(quantization=kind, device="cuda")
    with pytest.raises(ValueError, match="int8, int4"):
        WorkerConfig(quantization="int2")


@int8
@KINDS
def test_an_integer_worker_lets_go_of_the_checkpoint_file_and_generates(built, tiny_llava, tmp_path, kind) -> None:
    """The worker's loading path with --quantization int8 / int4: the engine runs integer layers, the float
    tensors that stay were copied off the memory-mapped checkpoint (no mapping of its file is left,
    so the float32 pages fusing read are not held), and a request runs to its token limit."""
    import shutil

    from llava_serve.worker.config import WorkerConfig
    from llava_serve.worker.loading import load_model_and_engine

    folder = shutil.copytree(tiny_llava, tmp_path / f"{kind}-checkpoint")  # a file only this model maps
    lm, eng = load_model_and_engine(WorkerConfig(model_path=str(folder), device="cpu", quantization=kind))
    assert isinstance(eng, BatchEngine) and eng.runner.forward.w.quantization == kind
    with open("/proc/self/maps") as maps:
        assert str(folder) not in maps.read()
    req = request(lm.tokenizer("a short prompt")["input_ids"], 6)
    drive(eng, {0: [req]})
    assert len(req.output_ids) == 6


@int8
def test_a_half_precision_checkpoint_is_quantized_from_its_own_floats(built, tiny_llava, tmp_path, monkeypatch) -> None:
    """--quantization on a bfloat16 checkpoint loads it as stored (never widened to float32 first),
    quantizes the layers from it, and leaves what stays float (vision tower, embeddings, norms) in
    float32 for the kernels; its logits track the same checkpoint quantized from float32."""
    from transformers import AutoModelForImageTextToText

    from llava_serve.models import loader
    from llava_serve.models.options import stored_float_dtype
    from llava_serve.worker import loading
    from llava_serve.worker.config import WorkerConfig

    half = tmp_path / "bf16"
    AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.bfloat16).save_pretrained(half)
    for f in Path(tiny_llava).iterdir():
        if not f.name.endswith((".safetensors", "config.json")) or f.name == "processor_config.json":
            shutil.copy(f, half / f.name)
    assert stored_float_dtype(half) == "bfloat16" and stored_float_dtype(Path(tiny_llava)) == "float32"
    asked = []
    real_load = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda options: asked.append(options.dtype) or real_load(options))
    lm, eng = loading.load_model_and_engine(WorkerConfig(model_path=str(half), device="cpu", quantization="int8"))
    assert asked == ["bfloat16"]
    floats = [p for p in lm.model.parameters() if p.dtype.is_floating_point and not p.is_meta]
    assert floats and all(p.dtype == torch.float32 for p in floats) and lm.dtype == torch.float32
    _, reference = loading.load_model_and_engine(
        WorkerConfig(model_path=str(tiny_llava), device="cpu", quantization="int8")
    )
    results = []
    for engine in (eng, reference):
        req = request(lm.tokenizer("a short prompt")["input_ids"], 6)
        results.append(drive(engine, {0: [req]}))
    for (_, pos_a, got), (_, pos_b, expected) in zip(*results, strict=True):
        assert pos_a == pos_b
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # bfloat16 rounding, then int8


@int8
@KINDS
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_integer_batched_steps_in_one_call_match_the_layer_by_layer_path(built, tokenizer, family, kind) -> None:
    """decode_rows_q8 (a step of several rows, decode rows and prompt chunks, through every int8 / int4
    layer in one call) against the layer-by-layer int8 path: two engines on the same weights, the
    same requests joining and leaving (Qwen2's QKV bias); both quantize each matmul's input the
    same way, so their logits agree to float32 rounding at every sampled position."""

    def engine(one_call: bool) -> BatchEngine:
        eng = BatchEngine(
            tiny_lm(tokenizer, family),
            max_running=3,
            max_waiting=8,
            step_tokens=12,
            adapt_threads=False,
            prefix_cache_bytes=0,
            quantization=kind,
        )
        eng.runner.forward.quantized_steps = one_call
        eng.scheduler.costs = None  # the same chunks in both engines (not sized from their timings)
        return eng

    fast, reference = engine(True), engine(False)
    assert fast.runner.forward.row_step is not None
    calls = []
    real_rows = fast.runner.forward.row_step.rows

    def counted(x, positions, cache_rows, *rest):
        calls.append((len(positions), len(set(cache_rows))))
        return real_rows(x, positions, cache_rows, *rest)

    fast.runner.forward.row_step.rows = counted  # type: ignore[method-assign]
    results = []
    for eng in (fast, reference):
        reqs = [request(p, n) for p, n in zip(prompts(5, base=6), [9, 4, 12, 6, 7])]
        results.append(drive(eng, {0: reqs[:2], 3: reqs[2:4], 6: reqs[4:]}))
    assert any(n > rows for n, rows in calls)  # steps with prompt chunks went through the one call
    assert any(n == rows and n > 1 for n, rows in calls)  # and decode-only steps of several rows
    assert len(results[0]) == len(results[1])
    for (_, pos_a, got), (_, pos_b, expected) in zip(*results, strict=True):
        assert pos_a == pos_b
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_environment_switch_picks_where_the_kernels_run(built, tokenizer, monkeypatch) -> None:
    """LLAVA_SERVE_CPU_GEMV: unset, a model this small stays on oneDNN (its weights sit in cache);
    `all` puts it on the compiled kernels; `0` refuses int8, which has no other path."""
    from llava_serve.engine.runners import build_runner
    from llava_serve.errors import ModelLoadError

    monkeypatch.delenv("LLAVA_SERVE_CPU_GEMV", raising=False)
    assert not decoder_weights.build_decoder_weights(tiny_lm(tokenizer, "llama").model).row_step
    monkeypatch.setenv("LLAVA_SERVE_CPU_GEMV", "all")
    assert decoder_weights.build_decoder_weights(tiny_lm(tokenizer, "llama").model).row_step
    monkeypatch.setenv("LLAVA_SERVE_CPU_GEMV", "0")
    with pytest.raises(ModelLoadError, match="LLAVA_SERVE_CPU_GEMV=0"):
        build_runner(tiny_lm(tokenizer, "llama"), 2, quantization="int8")
