"""The decoder's weights in serving shape: fused QKV and gate-up matrices, built from a loaded model.

`DecoderRunner` runs Llama, Mistral and Qwen2 decoders (what LLaVA, LLaVA-NeXT, original LLaVA
and InternVL -hf checkpoints end up as in transformers) from these tensors instead of through
transformers' modules. `unsupported_reason` says why a config is left to the transformers path.

The fused matrices are built once, at load, and the transformers modules' parameters are then
pointed at row slices of them (views, same values), so the model keeps working (`generate`, the
fallback path) and the weights are not held twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llava_serve.engine import cpu_gemv
from llava_serve.models import options as models_options

log = logging.getLogger(__name__)

FAMILIES = {"llama", "mistral", "qwen2"}
# float32 decoders with more linear weight bytes than this (several times the last-level cache, so
# a one-row step streams them from memory) use the compiled one-row GEMV (cpu_gemv.py)
GEMV_MIN_BYTES = 64 << 20
# what build_decoder_weights(quantization=...) takes (None: the checkpoint's own dtype)
QUANTIZATIONS: tuple[str | None, ...] = (None, *models_options.QUANTIZATIONS)
# rope types whose frequencies do not depend on the sequence length (dynamic/longrope do)
STATIC_ROPE = {"default", "linear", "llama3"}


@dataclass
class Linear:
    """A weight (and bias), with an optional oneDNN-prepacked copy, used for every call.

    oneDNN's packed kernel skips the per-call repacking that `F.linear` does (at 16 rows on the
    2-core test machine that was about half the time of a matmul). At one row it streams the weight
    faster than `F.linear`'s MKL GEMV too on this project's CI machine (AMD EPYC, 2 threads; 12
    bench-sized float32 weights: 5.8-6.5 ms packed vs 8.6-10.8 ms, 21-24 vs 13-16 GB/s; `python
    benchmarks/linear_kernels.py`), although an earlier measurement on a Sapphire Rapids machine had
    it the other way (prepack.py). In bfloat16 the packed kernel is the fast one at every row count
    (AVX-512 BF16: 1 row 4.7 ms packed vs 56 ms `F.linear`)."""

    weight: torch.Tensor  # [out, in]; int8 / int4 weights: packed by cpu_gemv.q8_pack / q4_pack (uint8)
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    row_kernel: bool = False  # one-row calls go to cpu_gemv's compiled kernel
    scale: torch.Tensor | None = None  # int8: float32 [out], weight ~ q * scale; int4: float16 group scales
    outputs: int = 0  # int8 / int4 weights: the output width (the packed weight's is padded)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return cpu_gemv.q_linear(x, self.weight, self.scale, self.outputs, self.bias)
        if self.row_kernel and x.shape[0] == 1:
            return cpu_gemv.gemv(x, self.weight, self.bias)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def pack(self, rows_hint: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, max(rows_hint, 2))

    def quantize(self, kind: str) -> None:
        """int8 per output channel (cpu_gemv.q8_pack) or int4 in groups of 32 (q4_pack); the float
        weight is let go."""
        self.outputs = self.weight.shape[0]
        pack = cpu_gemv.q4_pack if kind == "int4" else cpu_gemv.q8_pack
        self.weight, self.scale = pack(self.weight)
        self.packed = None
        self.row_kernel = False


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass
class DecoderWeights:
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: Linear
    embed: torch.Tensor  # [vocab, hidden]
    inv_freq: torch.Tensor  # the model's own rotary frequencies
    rope_scaling: float  # transformers' `attention_scaling` (1.0 except for some rope types)
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    row_step: bool = False  # one-row decode steps run every layer in one call of cpu_gemv.decode_row
    quantization: str | None = None  # the layers' linear weights are int8 or int4 (QUANTIZATIONS); lm_head int8

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def text_parts(model: Any) -> tuple[Any, Any, Any]:
    """(text config, decoder with .layers/.norm/.rotary_emb, lm_head) of a CausalLM or a VLM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    decoder = getattr(decoder, "language_model", decoder)  # some VLMs' get_decoder is the outer model
    head = model.get_output_embeddings()
    return getattr(decoder, "config", None), decoder, head


def unsupported_reason(model: Any) -> str | None:
    """None when DecoderRunner runs this model exactly; else why it stays on transformers."""
    config, decoder, head = text_parts(model)
    if config is None or decoder is None or head is None:
        return "no text decoder found"
    if config.model_type not in FAMILIES:
        return f"decoder family {config.model_type!r} (handled: {sorted(FAMILIES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        return f"rope type {rope.get('rope_type')!r}"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return f"sliding window {window} shorter than the context"
    linears = [m for layer in decoder.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    if any(type(m) is not torch.nn.Linear for m in [*linears, head]):
        return "quantized or adapted linear layers"
    if any(m.weight.is_meta for m in linears):
        return "an engine with int8 or int4 weights has taken its float weights (load the model again)"
    if head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weights in {head.weight.dtype}"
    return None


def quantization_unsupported_reason(model: Any) -> str | None:
    """None when the decoder's layers can run with int8 or int4 weights here; else why not."""
    reason = unsupported_reason(model)
    if reason is not None:
        return f"the decoder runner cannot run it ({reason})"
    config, decoder, head = text_parts(model)
    if head.weight.device.type != "cpu":
        return f"int8 and int4 weights run on the CPU (the model is on {head.weight.device})"
    widths = {
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads * decoder.layers[0].self_attn.head_dim,
    }
    if any(w % 32 for w in widths):
        return f"int8 and int4 weights need layer widths that are multiples of 32 (got {sorted(widths)})"
    return cpu_gemv.quantized_unavailable()


def build_decoder_weights(model: Any, prepack_rows: int = 0, quantization: str | None = None) -> DecoderWeights:
    """Fuse the decoder's weights (call `unsupported_reason` first); prepack for `prepack_rows` > 1;
    `quantization="int8"` or `"int4"` (check `quantization_unsupported_reason` first): the layers'
    linear weights become integers, and the transformers modules lose theirs (the model runs only
    through the runner then)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS[1:]}")
    config, decoder, head = text_parts(model)
    if quantization is None and head.weight.device.type == "cpu":
        # fusing copies QKV and gate-up; the other float tensors are copied off the memory-mapped
        # checkpoint first, so no mapping is left holding the file pages fusing read (~600 MiB of
        # float32 pages on the bench checkpoint, besides the copies)
        from llava_serve.models.quant import detach_from_checkpoint

        detach_from_checkpoint(model)
    with torch.no_grad():  # quantizing: each layer as it is fused, its float weights let go at once
        layers = [_fuse_layer(layer, quantization) for layer in decoder.layers]
    attn = decoder.layers[0].self_attn
    weights = DecoderWeights(
        layers=layers,
        norm=decoder.norm.weight.detach(),
        lm_head=Linear(head.weight.detach(), _detached(head.bias)),
        embed=decoder.embed_tokens.weight.detach(),
        inv_freq=decoder.rotary_emb.inv_freq.detach().float(),
        rope_scaling=float(decoder.rotary_emb.attention_scaling),
        eps=float(config.rms_norm_eps),
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=attn.head_dim,
        intermediate=config.intermediate_size,
    )
    if quantization is not None:
        weights.quantization = quantization
        weights.row_step = True
        _off_the_checkpoint(model, weights)
        _quantize_head(weights, model)
        _return_freed_memory()
        log.info("the decoder's layers run with %s weights (%d layers)", quantization, len(layers))
        return weights
    bf16 = head.weight.dtype == torch.bfloat16
    if (prepack_rows > 1 or bf16) and _can_prepack(head.weight):
        for lin in _linears(weights):
            lin.pack(prepack_rows)
        log.info("prepacked the decoder's %s linear weights for batches of %d rows", head.weight.dtype, prepack_rows)
    elif bf16 and head.weight.device.type == "cpu":
        log.warning("this CPU has no native bfloat16 matmul (oneDNN): bfloat16 weights decode slower than float32")
    linears = _linears(weights)
    size = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
    on_cpu_f32 = head.weight.device.type == "cpu" and head.weight.dtype == torch.float32
    on_cpu = head.weight.device.type == "cpu" and head.weight.dtype in (torch.float32, torch.bfloat16)
    if on_cpu and (size >= GEMV_MIN_BYTES or cpu_gemv.for_any_size()) and cpu_gemv.kernel() is not None:
        if on_cpu_f32:
            for lin in linears:
                lin.row_kernel = lin.weight.is_contiguous()
        weights.row_step = True
        log.info("one-row decode steps use the compiled %s kernels (%d MB of weights)", head.weight.dtype, size >> 20)
    return weights


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): quantizing frees each
    layer's float copies between the long-lived packed weights, and glibc keeps such holes mapped (an
    int8 engine from the bench checkpoint: 909 MiB RSS after loading without this, 563 with it.)"""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _quantize_head(weights: DecoderWeights, model: Any) -> None:
    """lm_head as int8 per output channel, under int8 and int4 alike (llama.cpp keeps a q4_0 model's
    output matrix in 6 bits, a q8_0 one's in 8): a 7B model's float32 lm_head (32k x 4096) is 0.5 GB,
    read at every step, 12% of an int4 step's bytes. Its float copy is freed unless the embeddings
    share it (tied weights)."""
    _, decoder, head = text_parts(model)
    tied = head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()
    weights.lm_head.quantize("int8")
    if not tied:
        _let_go(head)


def _off_the_checkpoint(model: Any, weights: DecoderWeights) -> None:
    """Copy the float tensors that stay (vision tower, embeddings, norms, lm_head) out of the memory-
    mapped checkpoint, in float32 (a half-precision checkpoint is loaded as stored when quantizing),
    and point the runner's weights at the copies. While any tensor viewed the mapping, all of it
    stayed mapped, with every page fusing had read resident: an int8 worker on the bench checkpoint
    held 592 MiB of float32 file pages besides its 154 MiB of int8 weights."""
    from llava_serve.models.quant import detach_from_checkpoint

    if any(p.dtype != torch.float32 for p in model.parameters() if p.dtype.is_floating_point and not p.is_meta):
        model.to(torch.float32)  # the kernels' norms, biases, embeddings and the vision tower: float32
    detach_from_checkpoint(model)
    _, decoder, head = text_parts(model)
    weights.embed = decoder.embed_tokens.weight.detach()
    weights.norm = decoder.norm.weight.detach()
    weights.lm_head.weight = head.weight.detach()
    weights.lm_head.bias = _detached(head.bias)
    for lw, layer in zip(weights.layers, decoder.layers, strict=True):
        lw.input_norm = layer.input_layernorm.weight.detach()
        lw.post_norm = layer.post_attention_layernorm.weight.detach()
        lw.o.bias = _detached(layer.self_attn.o_proj.bias)
        lw.down.bias = _detached(layer.mlp.down_proj.bias)
        if lw.qkv.bias is not None:  # the fused bias is the runner's own tensor
            lw.qkv.bias = lw.qkv.bias.float()


def _fuse_layer(layer: Any, quantization: str | None = None) -> LayerWeights:
    """A layer's fused weights; with `quantization` its linears become int8 or int4 (`Linear.quantize`:
    vpdpbusd takes 64 int8 products an instruction where an FMA takes 16 float32 ones, and a one-row
    step reads a quarter, or about an eighth, of float32's bytes) and the transformers modules' float
    weights are let go (`_let_go`), so this layer's floats are freed before the next is fused."""
    attn, mlp = layer.self_attn, layer.mlp
    weights = LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(),
        qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
        o=Linear(attn.o_proj.weight.detach(), _detached(attn.o_proj.bias)),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up=_fuse([mlp.gate_proj, mlp.up_proj]),
        down=Linear(mlp.down_proj.weight.detach(), _detached(mlp.down_proj.bias)),
    )
    if quantization is not None:
        for lin in (weights.qkv, weights.o, weights.gate_up, weights.down):
            lin.quantize(quantization)
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                _let_go(module)
    return weights


def _let_go(linear: torch.nn.Linear) -> None:
    """Point a transformers Linear whose weight the runner now holds as integers at an empty meta
    tensor: its float copy is freed, and any use outside the runner fails loudly, not silently."""
    linear.weight = torch.nn.Parameter(torch.empty_like(linear.weight, device="meta"), requires_grad=False)


def _fuse(parts: list[torch.nn.Linear]) -> Linear:
    """One matrix for several linears of the same input; the linears become views of it."""
    weight = torch.cat([p.weight.detach() for p in parts])
    has_bias = [p.bias is not None for p in parts]
    bias = None
    if any(has_bias):
        bias = torch.cat([p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features) for p in parts])
    start = 0
    for p in parts:
        end = start + p.out_features
        p.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
        if p.bias is not None and bias is not None:
            p.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return Linear(weight, bias)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _linears(w: DecoderWeights) -> list[Linear]:
    return [w.lm_head] + [lin for layer in w.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]


def _can_prepack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32
