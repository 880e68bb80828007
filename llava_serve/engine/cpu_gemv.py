"""A float32 matrix-vector product for one-row decode steps on AVX-512 CPUs.

At one row a decode step is the weight stream: every weight is read once to multiply one vector.
PyTorch's kernels for it read float32 weights at 13-16 GB/s (MKL's GEMV under `F.linear`) and
20-25 GB/s (oneDNN's packed kernel) on this project's 2-core AMD EPYC, where a plain reduction
over the same bytes reads at ~32 GB/s and OpenVINO's kernels stream a whole step at ~35. This
kernel keeps the weight in its own row-major layout, gives each thread a contiguous block of rows
(one linear stream per thread, which the hardware prefetcher follows) and takes four rows per
pass over the input vector with AVX-512 FMAs: 33.7 GB/s against oneDNN's 25.5 on twelve
bench-sized weights (`python benchmarks/linear_kernels.py --rows 1 --threads 2`).

It is compiled once with the machine's C++ compiler through `torch.utils.cpp_extension` (about
40 s on 2 cores; cached under torch's extensions folder) when a model big enough to be bound by
its weight stream is loaded; where AVX-512, a compiler or the build is missing it is not used
(a warning, and the oneDNN path as before); it needs a C++ compiler and `ninja` on PATH.
`LLAVA_SERVE_CPU_GEMV=0` turns it off.
Sums are taken in another order than oneDNN's (differences ~1e-6 relative).
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
#include <cstring>
#include <vector>

static inline float dot_tail(const float* w, const float* x, int64_t k0, int64_t in, __m512 acc) {
  if (k0 < in) {
    const __mmask16 m = (__mmask16)((1u << (in - k0)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k0), _mm512_maskz_loadu_ps(m, x + k0), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Y[out] = X[in] @ W[out, in].T for rows [r0, r1): four rows a pass over X.
static void gemv_rows(const float* X, const float* W, float* Y, int64_t r0, int64_t r1, int64_t in) {
  const int64_t body = in / 16 * 16;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* w0 = W + r * in;
    const float* w1 = w0 + in;
    const float* w2 = w1 + in;
    const float* w3 = w2 + in;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < body; k += 16) {
      const __m512 xv = _mm512_loadu_ps(X + k);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xv, a3);
    }
    Y[r] = dot_tail(w0, X, body, in, a0);
    Y[r + 1] = dot_tail(w1, X, body, in, a1);
    Y[r + 2] = dot_tail(w2, X, body, in, a2);
    Y[r + 3] = dot_tail(w3, X, body, in, a3);
  }
  for (; r < r1; ++r) {
    const float* wr = W + r * in;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < body; k += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(X + k), a);
    Y[r] = dot_tail(wr, X, body, in, a);
  }
}

// each thread a contiguous block of rows (one linear stream per thread), in blocks of four rows
static void gemv_into(const float* X, const float* W, float* Y, int64_t out, int64_t in) {
  at::parallel_for(0, (out + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    gemv_rows(X, W, Y, begin * 4, std::min(end * 4, out), in);
  });
}

// y[1, out] = x[1, in] @ w[out, in].T
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 2 && x.numel() == w.size(1), "shapes");
  auto y = torch::empty({1, w.size(0)}, x.options());
  pybind11::gil_scoped_release no_gil;  // the worker's event loop runs meanwhile
  gemv_into(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), w.size(0), w.size(1));
  return y;
}

static inline float dot(const float* a, const float* b, int64_t n) {
  const int64_t body = n / 16 * 16;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < body; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
  return dot_tail(a, b, body, n, acc);
}

// transformers' LlamaRMSNorm in float32: x * rsqrt(mean(x^2) + eps) * weight
static void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
  float ss = dot(x, x, n);
  const float scale = 1.0f / std::sqrt(ss / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * scale);
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
static void attend(const float* q, const float* K, const float* V, int64_t len, int64_t d, float scale, float* sc,
                   float* o) {
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
    const float* v = V + p * d;
    for (int64_t i = 0; i < d; ++i) o[i] += wgt * v[i];
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

// One decode step of one row through every layer of a Llama/Mistral/Qwen2 decoder, float32: the
// residual stream x [hidden] is updated in place. Weights are the fused QKV / gate-up matrices; the
// new key and value go to row 0, position `pos` of each layer's cache [rows, kv_heads, cols, d],
// and the query attends over positions [0, pos]. Biases: QKV only (Qwen2), or none.
void decode_row(torch::Tensor x, std::vector<torch::Tensor> in_norm, std::vector<torch::Tensor> qkv_w,
                std::vector<torch::Tensor> qkv_b, std::vector<torch::Tensor> o_w,
                std::vector<torch::Tensor> post_norm, std::vector<torch::Tensor> gate_up_w,
                std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> keys,
                std::vector<torch::Tensor> values, torch::Tensor cos, torch::Tensor sin, int64_t pos,
                int64_t heads, int64_t kv_heads, double eps) {
  const int64_t layers = (int64_t)qkv_w.size();
  const int64_t hidden = x.numel(), d = cos.numel();
  const int64_t qw = heads * d, kw = kv_heads * d, inter = down_w[0].size(1), group = heads / kv_heads;
  TORCH_CHECK(x.is_contiguous() && x.dtype() == torch::kFloat32, "x: contiguous float32");
  TORCH_CHECK(qkv_b.empty() || (int64_t)qkv_b.size() == layers, "qkv biases: none or one per layer");
  const int64_t cols = keys[0].size(2), len = pos + 1;
  TORCH_CHECK(pos < cols, "position beyond the cache");
  std::vector<float> h(hidden), qkv(qw + 2 * kw), attn(qw), gu(2 * inter), act(inter), y(std::max(hidden, inter));
  std::vector<float> scores(heads * len);
  float* X = x.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  const float scale = 1.0f / std::sqrt((float)d);
  for (int64_t l = 0; l < layers; ++l)
    for (auto* t : {&qkv_w[l], &o_w[l], &gate_up_w[l], &down_w[l], &keys[l], &values[l]})
      TORCH_CHECK(t->is_contiguous() && t->dtype() == torch::kFloat32, "weights and cache: contiguous float32");
  // a step takes ~20 ms: holding the GIL through it would stall the worker's event loop (frames,
  // new requests) and hand the GIL back to this thread only after Python's switch interval
  pybind11::gil_scoped_release no_gil;
  for (int64_t l = 0; l < layers; ++l) {
    rms_norm(X, in_norm[l].data_ptr<float>(), h.data(), hidden, (float)eps);
    gemv_into(h.data(), qkv_w[l].data_ptr<float>(), qkv.data(), qw + 2 * kw, hidden);
    if (!qkv_b.empty()) {
      const float* b = qkv_b[l].data_ptr<float>();
      for (int64_t i = 0; i < qw + 2 * kw; ++i) qkv[i] += b[i];
    }
    for (int64_t hd = 0; hd < heads + kv_heads; ++hd) rope(qkv.data() + hd * d, C, S, d);
    float* K = keys[l].data_ptr<float>();  // row 0: [kv_heads, cols, d]
    float* V = values[l].data_ptr<float>();
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::memcpy(K + (g * cols + pos) * d, qkv.data() + qw + g * d, d * sizeof(float));
      std::memcpy(V + (g * cols + pos) * d, qkv.data() + qw + kw + g * d, d * sizeof(float));
    }
    at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t hd = h0; hd < h1; ++hd)
        attend(qkv.data() + hd * d, K + (hd / group) * cols * d, V + (hd / group) * cols * d, len, d, scale,
               scores.data() + hd * len, attn.data() + hd * d);
    });
    gemv_into(attn.data(), o_w[l].data_ptr<float>(), y.data(), hidden, qw);
    for (int64_t i = 0; i < hidden; ++i) X[i] += y[i];
    rms_norm(X, post_norm[l].data_ptr<float>(), h.data(), hidden, (float)eps);
    gemv_into(h.data(), gate_up_w[l].data_ptr<float>(), gu.data(), 2 * inter, hidden);
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gu[i];
      act[i] = g / (1.0f + std::exp(-g)) * gu[inter + i];
    }
    gemv_into(act.data(), down_w[l].data_ptr<float>(), y.data(), hidden, inter);
    for (int64_t i = 0; i < hidden; ++i) X[i] += y[i];
  }
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
            extra_cflags=["-O3", "-mavx512f", "-fopenmp"],
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


def decode_row(x: torch.Tensor, *args: Any) -> None:
    """One row's decode step through every layer, in place on x [hidden] (decoder.RowStep)."""
    module = kernel()
    assert module is not None
    module.decode_row(x, *args)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Decode attention, one query per row: q [B, heads, d] over each row's first `lengths[b]`
    positions of the cache [rows, kv_heads, cols, d] -> [B, heads * d] (float32)."""
    module = kernel()
    assert module is not None
    return module.decode_attention(q.contiguous(), keys, values, lengths)
