"""Compiled float32 kernels for decode steps on AVX-512 CPUs: a one-row GEMV, a whole one-row
decoder step, and decode attention.

At one row a decode step is the weight stream: every weight is read once to multiply one vector.
PyTorch's kernels for it read float32 weights at 13-16 GB/s (MKL's GEMV under `F.linear`) and
20-25 GB/s (oneDNN's packed kernel) on this project's 2-core AMD EPYC, where a plain reduction
over the same bytes reads at ~32 GB/s and OpenVINO's kernels stream a whole step at ~35. This
kernel keeps the weight in its own row-major layout, gives each thread a contiguous block of rows
read one row at a time (one linear stream per thread, which the hardware prefetcher follows) with
AVX-512 FMAs: 33.7 GB/s against oneDNN's 25.5 on twelve bench-sized weights (`python
benchmarks/linear_kernels.py --rows 1 --threads 2`, when it took four rows per pass; one row at a
time read the bench model's 48 weights 10-25% faster on 2026-12-03).

It is compiled once with the machine's C++ compiler through `torch.utils.cpp_extension` (about
40 s on 2 cores; cached under torch's extensions folder) when a model big enough to be bound by
its weight stream is loaded; where AVX-512, a compiler or the build is missing it is not used
(a warning, and the oneDNN path as before); it needs a C++ compiler and `ninja` on PATH.
`LLAVA_SERVE_CPU_GEMV=0` turns it off; `LLAVA_SERVE_CPU_GEMV=all` uses it for models of any size
(for checks on small models; their weights stay in cache, where oneDNN's kernels are as fast).
Sums are taken in another order than oneDNN's (differences ~1e-6 relative).

Built on the GEMV, `decode_row` runs a one-row step through every layer in one call (RMS norms,
fused QKV, rotary, the cache write, attention, output projection, SiLU MLP; decoder.RowStep),
so the ~350 small torch ops of the layer-by-layer path and their dispatch are gone from the
step; `decode_attention` is attention for decode rows (one query per row, each over its own
length of the slot cache), which torch's CPU flash kernel does slowly (it blocks queries for
long query runs). Both release the GIL while they run, so the worker's event loop keeps
streaming.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Weights and the KV cache are float or bfloat16 (bits in a uint16_t); arithmetic is float32.
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline float tof(float v) { return v; }
static inline float tof(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void put(float* dst, float v) { *dst = v; }
static inline void put(uint16_t* dst, float v) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  *dst = std::isnan(v) ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

template <typename W>
static inline float dot_tail(const W* w, const float* x, int64_t k0, int64_t in, __m512 acc) {
  if (k0 < in) {
    const __mmask16 m = (__mmask16)((1u << (in - k0)) - 1u);
    acc = _mm512_fmadd_ps(load16(w + k0, m), _mm512_maskz_loadu_ps(m, x + k0), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Y[out] = X[in] @ W[out, in].T for rows [r0, r1): one row at a time with four accumulators over k,
// so a thread reads its rows as one linear stream (four rows a pass, four streams 1-4 KB apart, read
// 10-25% slower on the bench's weights)
template <typename W>
static void gemv_rows(const float* X, const W* Wt, float* Y, int64_t r0, int64_t r1, int64_t in) {
  const int64_t body4 = in / 64 * 64, body = in / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const W* w = Wt + r * in;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < body4; k += 64) {
      a0 = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(X + k), a0);
      a1 = _mm512_fmadd_ps(load16(w + k + 16), _mm512_loadu_ps(X + k + 16), a1);
      a2 = _mm512_fmadd_ps(load16(w + k + 32), _mm512_loadu_ps(X + k + 32), a2);
      a3 = _mm512_fmadd_ps(load16(w + k + 48), _mm512_loadu_ps(X + k + 48), a3);
    }
    for (; k < body; k += 16) a0 = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(X + k), a0);
    Y[r] = dot_tail(w, X, body, in, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// each thread a contiguous block of rows (one linear stream per thread), in blocks of four rows
template <typename W>
static void gemv_into(const float* X, const W* Wt, float* Y, int64_t out, int64_t in) {
  at::parallel_for(0, (out + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    gemv_rows(X, Wt, Y, begin * 4, std::min(end * 4, out), in);
  });
}

// bfloat16 weights on CPUs with AVX512_BF16: the input is rounded to bfloat16 once (as oneDNN's
// bfloat16 matmul takes it) and each instruction multiplies 32 weight/input pairs into float32 sums
// (vdpbf16ps). Converting the weights to float32 instead (shift, FMA) is bound by those
// conversions: ~20 GB/s of weights against the memory's ~30 on the 2-core EPYC this was written on.
__attribute__((target("avx512bf16"))) static inline float dp_row_tail(const uint16_t* w, const uint16_t* x,
                                                                      int64_t body, __mmask32 tail, __m512 acc) {
  if (tail)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + body),
                           (__m512bh)_mm512_maskz_loadu_epi16(tail, x + body));
  return _mm512_reduce_add_ps(acc);
}

// as gemv_rows: one row at a time, four accumulators over k
__attribute__((target("avx512bf16"))) static void gemv_rows_dp(const uint16_t* X, const uint16_t* Wt, float* Y,
                                                                 int64_t r0, int64_t r1, int64_t in) {
  const int64_t body4 = in / 128 * 128, body = in / 32 * 32;
  const __mmask32 tail = (__mmask32)((1ull << (in - body)) - 1ull);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* w = Wt + r * in;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < body4; k += 128) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(X + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(X + k + 32));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + k + 64), (__m512bh)_mm512_loadu_si512(X + k + 64));
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + k + 96), (__m512bh)_mm512_loadu_si512(X + k + 96));
    }
    for (; k < body; k += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(X + k));
    Y[r] = dp_row_tail(w, X, body, tail, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

static bool has_bf16_dot() {
  static const bool yes = [] {
    __builtin_cpu_init();  // this runs from a shared library's code, maybe before GCC's own init
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return yes;
}

static void gemv_into(const float* X, const uint16_t* Wt, float* Y, int64_t out, int64_t in) {
  if (!has_bf16_dot()) {
    gemv_into<uint16_t>(X, Wt, Y, out, in);
    return;
  }
  std::vector<uint16_t> xb(in);
  for (int64_t i = 0; i < in; ++i) put(&xb[i], X[i]);
  at::parallel_for(0, (out + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    gemv_rows_dp(xb.data(), Wt, Y, begin * 4, std::min(end * 4, out), in);
  });
}

// y[1, out] = x[1, in] @ w[out, in].T (float32)
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 2 && x.numel() == w.size(1), "shapes");
  auto y = torch::empty({1, w.size(0)}, x.options());
  pybind11::gil_scoped_release no_gil;  // the worker's event loop runs meanwhile
  gemv_into(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), w.size(0), w.size(1));
  return y;
}

template <typename W>
static inline float dot(const float* a, const W* b, int64_t n) {
  const int64_t body = n / 16 * 16;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < body; k += 16) acc = _mm512_fmadd_ps(load16(b + k), _mm512_loadu_ps(a + k), acc);
  return dot_tail(b, a, body, n, acc);
}

// transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight
template <typename W>
static void rms_norm(const float* x, const W* w, float* out, int64_t n, float eps) {
  const float ss = dot(x, x, n);
  const float scale = 1.0f / std::sqrt(ss / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = tof(w[i]) * (x[i] * scale);
}

// rotate_half rope on one head: out[i] = x[i] cos[i] - x[i+h] sin[i]; out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h]
static void rope(float* x, const float* c, const float* s, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] - b * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

// one query over `len` cached positions of one KV head ([len, d] keys and values): softmax(q.K / sqrt(d)) @ V
template <typename W>
static void attend(const float* q, const W* K, const W* V, int64_t len, int64_t d, float scale, float* sc, float* o) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < len; ++p) {
    sc[p] = dot(q, K + p * d, d) * scale;
    mx = std::max(mx, sc[p]);
  }
  float sum = 0.f;
  for (int64_t p = 0; p < len; ++p) {
    sc[p] = std::exp(sc[p] - mx);
    sum += sc[p];
  }
  std::fill(o, o + d, 0.f);
  const float inv = 1.0f / sum;
  for (int64_t p = 0; p < len; ++p) {
    const float wgt = sc[p] * inv;
    const W* v = V + p * d;
    for (int64_t i = 0; i < d; ++i) o[i] += wgt * tof(v[i]);
  }
}

// Decode attention of B rows, one query each: q [B, heads, d] over row b's first lengths[b]
// positions of the cache [rows, kv_heads, cols, d] (grouped-query heads share a KV head) -> [B, heads * d].
// torch's CPU flash kernel splits one query into blocks meant for long query runs; at one query per
// row it took ~1.4 ms a layer for 16 rows x 16 heads x 150 positions
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor lengths) {
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(q.dtype() == torch::kFloat32 && keys.dtype() == torch::kFloat32, "float32 only");
  const int64_t B = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = keys.size(1), cols = keys.size(2), group = heads / kv_heads;
  auto lens = lengths.to(torch::kLong).contiguous();
  const int64_t* L = lens.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(L[b] >= 1 && L[b] <= cols, "a row's length is outside the cache");
    longest = std::max(longest, L[b]);
  }
  auto out = torch::empty({B, heads * d}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* K = keys.data_ptr<float>();
  const float* V = values.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt((float)d);
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, B * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(longest);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / heads, hd = t % heads;
      const int64_t off = ((b * kv_heads) + hd / group) * cols * d;
      attend(Q + t * d, K + off, V + off, L[b], d, scale, sc.data(), O + t * d);
    }
  });
  return out;
}

template <typename W>
static const W* ptr(const torch::Tensor& t) {
  return reinterpret_cast<const W*>(t.data_ptr());
}

using Tensors = std::vector<torch::Tensor>;

template <typename W>
static void decode_row_impl(float* X, const Tensors& in_norm, const Tensors& qkv_w, const Tensors& qkv_b,
                            const Tensors& o_w, const Tensors& post_norm, const Tensors& gate_up_w,
                            const Tensors& down_w, const Tensors& keys, const Tensors& values, const float* C,
                            const float* S, int64_t pos, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d,
                            float eps) {
  const int64_t layers = (int64_t)qkv_w.size();
  const int64_t qw = heads * d, kw = kv_heads * d, inter = down_w[0].size(1), group = heads / kv_heads;
  const int64_t cols = keys[0].size(2), len = pos + 1;
  std::vector<float> h(hidden), qkv(qw + 2 * kw), attn(qw), gu(2 * inter), act(inter), y(std::max(hidden, inter));
  std::vector<float> scores(heads * len);
  const float scale = 1.0f / std::sqrt((float)d);
  for (int64_t l = 0; l < layers; ++l) {
    rms_norm(X, ptr<W>(in_norm[l]), h.data(), hidden, eps);
    gemv_into(h.data(), ptr<W>(qkv_w[l]), qkv.data(), qw + 2 * kw, hidden);
    if (!qkv_b.empty()) {
      const W* b = ptr<W>(qkv_b[l]);
      for (int64_t i = 0; i < qw + 2 * kw; ++i) qkv[i] += tof(b[i]);
    }
    for (int64_t hd = 0; hd < heads + kv_heads; ++hd) rope(qkv.data() + hd * d, C, S, d);
    W* K = reinterpret_cast<W*>(keys[l].data_ptr());  // row 0: [kv_heads, cols, d]
    W* V = reinterpret_cast<W*>(values[l].data_ptr());
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t i = 0; i < d; ++i) {
        put(K + (g * cols + pos) * d + i, qkv[qw + g * d + i]);
        put(V + (g * cols + pos) * d + i, qkv[qw + kw + g * d + i]);
      }
    at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t hd = h0; hd < h1; ++hd)
        attend<W>(qkv.data() + hd * d, K + (hd / group) * cols * d, V + (hd / group) * cols * d, len, d, scale,
                  scores.data() + hd * len, attn.data() + hd * d);
    });
    gemv_into(attn.data(), ptr<W>(o_w[l]), y.data(), hidden, qw);
    for (int64_t i = 0; i < hidden; ++i) X[i] += y[i];
    rms_norm(X, ptr<W>(post_norm[l]), h.data(), hidden, eps);
    gemv_into(h.data(), ptr<W>(gate_up_w[l]), gu.data(), 2 * inter, hidden);
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gu[i];
      act[i] = g / (1.0f + std::exp(-g)) * gu[inter + i];
    }
    gemv_into(act.data(), ptr<W>(down_w[l]), y.data(), hidden, inter);
    for (int64_t i = 0; i < hidden; ++i) X[i] += y[i];
  }
}

// One decode step of one row through every layer of a Llama/Mistral/Qwen2 decoder: the residual
// stream x [hidden] (float32) is updated in place. Weights (fused QKV / gate-up matrices, norms,
// QKV bias) and the cache are all float32 or all bfloat16; sums are float32 either way. The new key
// and value go to row 0, position `pos` of each layer's cache [rows, kv_heads, cols, d], and the
// query attends over positions [0, pos]. cos/sin: float32 rows for `pos`.
void decode_row(torch::Tensor x, std::vector<torch::Tensor> in_norm, std::vector<torch::Tensor> qkv_w,
                std::vector<torch::Tensor> qkv_b, std::vector<torch::Tensor> o_w,
                std::vector<torch::Tensor> post_norm, std::vector<torch::Tensor> gate_up_w,
                std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> keys,
                std::vector<torch::Tensor> values, torch::Tensor cos, torch::Tensor sin, int64_t pos,
                int64_t heads, int64_t kv_heads, double eps) {
  const int64_t layers = (int64_t)qkv_w.size();
  TORCH_CHECK(layers > 0 && x.is_contiguous() && x.dtype() == torch::kFloat32, "x: contiguous float32");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32, "cos/sin: float32");
  TORCH_CHECK(qkv_b.empty() || (int64_t)qkv_b.size() == layers, "qkv biases: none or one per layer");
  TORCH_CHECK(pos < keys[0].size(2), "position beyond the cache");
  const auto dtype = qkv_w[0].scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "weights: float32 or bfloat16");
  for (int64_t l = 0; l < layers; ++l) {
    for (auto* t : {&in_norm[l], &qkv_w[l], &o_w[l], &post_norm[l], &gate_up_w[l], &down_w[l], &keys[l], &values[l]})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == dtype, "weights and cache: contiguous, one dtype");
    if (!qkv_b.empty()) TORCH_CHECK(qkv_b[l].is_contiguous() && qkv_b[l].scalar_type() == dtype, "qkv bias");
  }
  float* X = x.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  const int64_t hidden = x.numel(), d = cos.numel();
  // a step takes 10-20 ms: holding the GIL through it would stall the worker's event loop (frames,
  // new requests) and hand the GIL back to this thread only after Python's switch interval
  pybind11::gil_scoped_release no_gil;
  if (dtype == torch::kFloat32)
    decode_row_impl<float>(X, in_norm, qkv_w, qkv_b, o_w, post_norm, gate_up_w, down_w, keys, values, C, S, pos,
                           hidden, heads, kv_heads, d, (float)eps);
  else
    decode_row_impl<uint16_t>(X, in_norm, qkv_w, qkv_b, o_w, post_norm, gate_up_w, down_w, keys, values, C, S, pos,
                              hidden, heads, kv_heads, d, (float)eps);
}
"""


def wanted() -> str | None:
    """Why the kernel is not used here (None: it can be built)."""
    if os.environ.get("LLAVA_SERVE_CPU_GEMV", "1") == "0":
        return "LLAVA_SERVE_CPU_GEMV=0"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return f"no AVX-512 ({torch.backends.cpu.get_cpu_capability()})"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler"
    if not shutil.which("ninja"):  # what torch's cpp_extension builds with (`pip install ninja` gives it)
        return "no ninja on PATH"
    return None


def for_any_size() -> bool:
    return os.environ.get("LLAVA_SERVE_CPU_GEMV", "1") == "all"


@functools.cache
def kernel() -> Any | None:
    """The compiled module (built once per process, from torch's cache after the first time), or None."""
    reason = wanted()
    if reason is not None:
        log.info("float32 one-row GEMV kernel not used: %s", reason)
        return None
    from torch.utils.cpp_extension import load_inline

    log.info("loading the float32 one-row GEMV kernel (compiled once, ~40 s the first time)")
    try:
        return load_inline(
            "llava_serve_cpu_gemv",
            cpp_sources=SOURCE,
            functions=["gemv", "decode_row", "decode_attention"],
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing header, an old compiler: the oneDNN path still works
        log.warning("could not build the float32 one-row GEMV kernel (%s); using oneDNN's", exc)
        return None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [1, in] @ weight[out, in].T (+ bias) with the compiled kernel (which must be loaded)."""
    module = kernel()
    assert module is not None
    y = module.gemv(x.contiguous(), weight)
    return y if bias is None else y.add_(bias)


def decode_row(
    x: torch.Tensor,
    weights: list[list[torch.Tensor]],
    kv: Any,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: int,
    shape: tuple[int, int, float],
) -> None:
    """One row's decode step through every layer, in place on x [hidden] (float32; decoder.RowStep):
    `weights` are the per-layer lists (input norms, QKV, QKV biases or [], output, post norms,
    gate-up, down), `kv` the slot cache (row 0), `shape` (heads, kv_heads, eps)."""
    module = kernel()
    assert module is not None
    heads, kv_heads, eps = shape
    module.decode_row(x, *weights, kv.keys, kv.values, cos, sin, pos, heads, kv_heads, eps)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Decode attention, one query per row: q [B, heads, d] over each row's first `lengths[b]`
    positions of the cache [rows, kv_heads, cols, d] -> [B, heads * d] (float32)."""
    module = kernel()
    assert module is not None
    return module.decode_attention(q.contiguous(), keys, values, lengths)
