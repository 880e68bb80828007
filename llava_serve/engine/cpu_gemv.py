"""Compiled kernels for decode steps on AVX-512 CPUs: a one-row float32/bfloat16 GEMV, a whole
one-row decoder step, decode attention, and int8 / int4 weight matmuls (AVX512-VNNI) with the
batched decoder step built on them (`--quantization`).

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
step; `decode_rows_attention` is the rotary, cache write and attention of batched decode rows
(one query per row, each over its own length of the slot cache), which torch's CPU flash kernel
does slowly (it blocks queries for long query runs). With integer weights (`q8_pack`: int8 per
output channel; `q4_pack`: int4 in groups of 32, as llama.cpp's q4_0) every matmul quantizes its
input rows to int8 and multiplies with `vpdpbusd` (`q_linear`), in `decode_row` at one row and in
`decode_rows_q8`, a step of any number of rows through every layer in one call. They release the
GIL while they run, so the worker's event loop keeps streaming.
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
#include <type_traits>
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

// ---- int8 weights (W8A8, dynamic activation quantization) with AVX512-VNNI ----
// A weight [N, K] is kept as int8 per output channel (w ~ q * scale[n], |q| <= 127), stored as
// q + 128 (unsigned) in blocks of 16 outputs: [ceil(N/32)*2][K/4][16][4] bytes, so that one 64-byte
// load holds four consecutive k of 16 outputs, which vpdpbusd multiplies with four int8 inputs
// broadcast to every lane. Inputs are quantized per row in groups of G (128, 64 or 32) k:
// x ~ xq * xs[g]; the unsigned offset is taken back with the group's sum of xq:
//   y[m, n] = scale[n] * sum_g xs[m, g] * (sum_k (q + 128) xq - 128 * sum_k xq).
static int64_t q8_group(int64_t K) {
  for (int64_t g : {128, 64, 32})
    if (K % g == 0) return g;
  return 0;
}

struct QuantRows {
  std::vector<int8_t> q;    // [M, K]
  std::vector<float> s;     // [M, K / G]
  std::vector<int32_t> c;   // [M, K / G]: 128 * sum of the group's q
  int64_t K = 0, G = 0, groups = 0;
};

// each row's groups of G inputs (0: q8_group's) as int8; `offset`: the weights' unsigned offset (128
// for int8, 8 for int4), taken back through c
static void quantize_rows(const float* X, int64_t M, int64_t K, QuantRows& out, int64_t G0 = 0, int32_t offset = 128) {
  out.K = K;
  out.G = G0 ? G0 : q8_group(K);
  out.groups = K / out.G;
  out.q.resize(M * K);
  out.s.resize(M * out.groups);
  out.c.resize(M * out.groups);
  const int64_t G = out.G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < out.groups; ++g) {
      const float* x = X + m * K + g * G;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t i = 0; i < G; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
      const float amax = _mm512_reduce_max_ps(mx);
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t i = 0; i < G; i += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv));  // nearest even
        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        _mm_storeu_si128((__m128i*)(out.q.data() + m * K + g * G + i), _mm512_cvtepi32_epi8(v));
        sum = _mm512_add_epi32(sum, v);
      }
      out.s[m * out.groups + g] = scale;
      out.c[m * out.groups + g] = offset * _mm512_reduce_add_epi32(sum);
    }
}

// the masks of a 32-output tile's two 16-lane halves at output n0 of N (the last tile may be short)
static inline void tile_masks(int64_t n0, int64_t N, __mmask16& k0, __mmask16& k1) {
  const int64_t left = std::min<int64_t>(32, N - n0);
  k0 = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
  k1 = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? (__mmask16)0 : (__mmask16)((1u << (left - 16)) - 1u);
}

// MB rows of a 32-output tile (two 16-lane halves f0, f1 per row) into Y at row m0, output n0
template <int MB>
static inline void store_tile(const __m512* f0, const __m512* f1, float* Y, int64_t ldy, int64_t m0, int64_t n0,
                              __mmask16 k0, __mmask16 k1) {
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    _mm512_mask_storeu_ps(Y + (m0 + m) * ldy + n0, k0, f0[m]);
    _mm512_mask_storeu_ps(Y + (m0 + m) * ldy + n0 + 16, k1, f1[m]);
  }
}

// M rows in tiles of 6, then one of the rest: tile(std::integral_constant<int, MB>(), m0) for each
template <typename Tile>
static inline void by_row_tiles(int64_t M, Tile&& tile) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) tile(std::integral_constant<int, 6>(), m);
  switch (M - m) {
    case 5: tile(std::integral_constant<int, 5>(), m); break;
    case 4: tile(std::integral_constant<int, 4>(), m); break;
    case 3: tile(std::integral_constant<int, 3>(), m); break;
    case 2: tile(std::integral_constant<int, 2>(), m); break;
    case 1: tile(std::integral_constant<int, 1>(), m); break;
    default: break;
  }
}

// MB rows x 32 outputs (two 16-output blocks W0, W1) over all of K
template <int MB>
__attribute__((target("avx512vnni"))) static void q8_tile(const QuantRows& X, int64_t m0, const uint8_t* W0,
                                                          const uint8_t* W1, const float* scale, int64_t n0,
                                                          int64_t N, float* Y, int64_t ldy) {
  const int64_t K = X.K, G = X.G, groups = X.groups;
  __m512 f0[MB], f1[MB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) f0[m] = f1[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i i0[MB], i1[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) i0[m] = i1[m] = _mm512_setzero_si512();
    const uint8_t* a = W0 + g * G * 16;
    const uint8_t* b = W1 + g * G * 16;
    const int8_t* x = X.q.data() + m0 * K + g * G;
    for (int64_t k = 0; k < G; k += 4) {
      const __m512i wa = _mm512_loadu_si512(a + k * 16), wb = _mm512_loadu_si512(b + k * 16);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        int32_t quad;
        std::memcpy(&quad, x + m * K + k, 4);
        const __m512i xb = _mm512_set1_epi32(quad);
        i0[m] = _mm512_dpbusd_epi32(i0[m], wa, xb);
        i1[m] = _mm512_dpbusd_epi32(i1[m], wb, xb);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const int64_t at = (m0 + m) * groups + g;
      const __m512i c = _mm512_set1_epi32(X.c[at]);
      const __m512 s = _mm512_set1_ps(X.s[at]);
      f0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i0[m], c)), s, f0[m]);
      f1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i1[m], c)), s, f1[m]);
    }
  }
  __mmask16 k0, k1;
  tile_masks(n0, N, k0, k1);
  const __m512 s0 = _mm512_maskz_loadu_ps(k0, scale + n0), s1 = _mm512_maskz_loadu_ps(k1, scale + n0 + 16);
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    f0[m] = _mm512_mul_ps(f0[m], s0);
    f1[m] = _mm512_mul_ps(f1[m], s1);
  }
  store_tile<MB>(f0, f1, Y, ldy, m0, n0, k0, k1);
}

// Y[M, N] (row stride ldy) = X[M, K] @ W.T for quantized rows X and a packed weight
static void q8_matmul(const QuantRows& X, int64_t M, const uint8_t* Wp, const float* scale, int64_t N, float* Y,
                      int64_t ldy) {
  const int64_t K = X.K, pairs = (N + 31) / 32;
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* W0 = Wp + (2 * p) * K * 16;
      const uint8_t* W1 = W0 + K * 16;
      by_row_tiles(M, [&](auto mb, int64_t m) {
        q8_tile<decltype(mb)::value>(X, m, W0, W1, scale, 32 * p, N, Y, ldy);
      });
    }
  });
}

// ---- int4 weights (W4A8) ----
// A weight [N, K] in groups of 32 k per output, as llama.cpp's q4_0: w ~ (u - 8) * d[n, g], u in
// 0..15, d float16. Stored in pairs of 16-output blocks A, B: [ceil(N/32)][K/32][8][16][4] bytes,
// byte j of output o in quad t of group g holding A's u for k = 32g + 4t + j in its low nibble and
// B's in its high one. One 64-byte load is then a quad of both blocks: `and 0x0F` gives A's as the
// int8 kernel lays them out, `and 0xF0` gives B's times 16 (no shift: B's sums are 16x, taken back
// in its scale), and both multiply the same broadcast input quad. Scales: [ceil(N/32)][K/32][2][16].
// Inputs are quantized per row in groups of 32 too, each group's sums taken in int32 and scaled by
// d[n, g] * xs[m, g]: y[m, n] = sum_g d[n, g] xs[m, g] (sum_k u xq - 8 sum_k xq).
constexpr int64_t Q4_GROUP = 32;

// MB rows x 32 outputs (the pair at W, its scales S) over all of K
template <int MB>
__attribute__((target("avx512vnni"))) static void q4_tile(const QuantRows& X, int64_t m0, const uint8_t* W,
                                                          const uint16_t* S, int64_t n0, int64_t N, float* Y,
                                                          int64_t ldy) {
  const int64_t K = X.K, groups = X.groups;
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
  __m512 f0[MB], f1[MB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) f0[m] = f1[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i i0[MB], i1[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) i0[m] = i1[m] = _mm512_setzero_si512();
    const uint8_t* w = W + g * Q4_GROUP * 16;
    const int8_t* x = X.q.data() + m0 * K + g * Q4_GROUP;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const __m512i v = _mm512_loadu_si512(w + t * 64);
      const __m512i a = _mm512_and_si512(v, low), b = _mm512_and_si512(v, high);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        int32_t quad;
        std::memcpy(&quad, x + m * K + t * 4, 4);
        const __m512i xb = _mm512_set1_epi32(quad);
        i0[m] = _mm512_dpbusd_epi32(i0[m], a, xb);
        i1[m] = _mm512_dpbusd_epi32(i1[m], b, xb);
      }
    }
    const __m512 da = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(S + g * 32)));
    const __m512 db = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(S + g * 32 + 16)));
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const int64_t at = (m0 + m) * groups + g;
      const float s = X.s[at];
      f0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i0[m], _mm512_set1_epi32(X.c[at]))),
                              _mm512_mul_ps(da, _mm512_set1_ps(s)), f0[m]);
      f1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i1[m], _mm512_set1_epi32(16 * X.c[at]))),
                              _mm512_mul_ps(db, _mm512_set1_ps(s * 0.0625f)), f1[m]);
    }
  }
  __mmask16 k0, k1;
  tile_masks(n0, N, k0, k1);
  store_tile<MB>(f0, f1, Y, ldy, m0, n0, k0, k1);
}

// Y[M, N] (row stride ldy) = X[M, K] @ W.T for rows quantized in groups of 32 and a q4_pack weight
static void q4_matmul(const QuantRows& X, int64_t M, const uint8_t* Wp, const uint16_t* scales, int64_t N, float* Y,
                      int64_t ldy) {
  const int64_t K = X.K, pairs = (N + 31) / 32, pair = K * 16, pair_scales = K / Q4_GROUP * 32;
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* W = Wp + p * pair;
      const uint16_t* S = scales + p * pair_scales;
      by_row_tiles(M, [&](auto mb, int64_t m) { q4_tile<decltype(mb)::value>(X, m, W, S, 32 * p, N, Y, ldy); });
    }
  });
}

// an integer weight's matmul, the kind told by its scales: float32 [N] for int8 (q8_pack), float16
// [pairs, K/32, 2, 16] for int4 (q4_pack); X [M, K] is quantized into `q` as that kind wants
static void qmatmul(const float* X, int64_t M, int64_t K, const torch::Tensor& w, const torch::Tensor& scale,
                    float* Y, int64_t N, int64_t ldy, QuantRows& q) {
  if (scale.scalar_type() == torch::kHalf) {
    quantize_rows(X, M, K, q, Q4_GROUP, 8);
    q4_matmul(q, M, w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr()), N, Y, ldy);
  } else {
    quantize_rows(X, M, K, q);
    q8_matmul(q, M, w.data_ptr<uint8_t>(), scale.data_ptr<float>(), N, Y, ldy);
  }
}

static bool has_vnni() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return yes;
}

// x [M, K] float32 @ a packed integer weight -> [M, N] float32: int8 (q8_pack; scale float32 [N]) or
// int4 (q4_pack; scale float16 [pairs, K/32, 2, 16])
torch::Tensor q_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t N) {
  TORCH_CHECK(has_vnni(), "int8 and int4 weights need AVX512-VNNI");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: [M, K] contiguous float32");
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.is_contiguous() && scale.is_contiguous(), "packed: uint8");
  const int64_t M = x.size(0), K = x.size(1), padded = (N + 31) / 32 * 32;
  if (scale.scalar_type() == torch::kHalf) {
    TORCH_CHECK(K % Q4_GROUP == 0 && packed.numel() == padded * K / 2 && scale.numel() == padded * K / Q4_GROUP,
                "int4 packed weight shape");
  } else {
    TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.numel() == N, "scale: float32 [N] or float16 groups");
    TORCH_CHECK(q8_group(K) > 0 && packed.numel() == padded * K, "int8 packed weight shape");
  }
  auto y = torch::empty({M, N}, x.options());
  pybind11::gil_scoped_release no_gil;
  QuantRows q;
  qmatmul(x.data_ptr<float>(), M, K, packed, scale, y.data_ptr<float>(), N, N, q);
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

// the rows' RMSNorms and SwiGLUs over rows in parallel: the batched calls below and decode_rows_q8
static void norm_rows_into(const float* X, const float* w, float* O, int64_t N, int64_t H, float eps) {
  at::parallel_for(0, N, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm(X + r * H, w, O + r * H, H, eps);
  });
}

// silu(gate) * up of N rows of the fused gate-up output [N, 2I] into O [N, I]
static void silu_mul_rows_into(const float* G, float* O, int64_t N, int64_t I) {
  at::parallel_for(0, N, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < I; ++i) {
        const float g = G[r * 2 * I + i];
        O[r * I + i] = g / (1.0f + std::exp(-g)) * G[r * 2 * I + I + i];
      }
  });
}

// RMSNorm of every row of x [N, H] with the weight w [H] (float32): the batched steps' norms in one
// call instead of the five torch ops of F.rms_norm's CPU path (~100 us a call at 16 x 1024)
torch::Tensor rms_norm_rows(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1), "shapes");
  auto out = torch::empty_like(x);
  const int64_t N = x.size(0), H = x.size(1);
  const float* X = x.data_ptr<float>();
  const float* Wt = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
  norm_rows_into(X, Wt, O, N, H, (float)eps);
  return out;
}

// SwiGLU of the fused gate-up output [N, 2I] -> silu(gate) * up [N, I] (float32)
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dtype() == torch::kFloat32 && gu.dim() == 2 && gu.is_contiguous(), "gu: [N, 2I] float32");
  const int64_t N = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({N, I}, gu.options());
  const float* G = gu.data_ptr<float>();
  float* O = out.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
  silu_mul_rows_into(G, O, N, I);
  return out;
}

// rotary, cache write and attention of B rows (see decode_rows_attention): row b goes to cache row
// R[b] (nullptr: row b) at position P[b] and attends over that cache row's positions [0, P[b]], so
// several rows in one cache row at consecutive positions are a causal prompt chunk (every key is
// written before any row attends); Q [B, heads d] is scratch for the rotated queries, O the output
static void rows_attention_into(const float* QKV, int64_t ld, int64_t B, const float* C, const float* S,
                                const int64_t* P, const int64_t* R, float* K, float* V, int64_t cols,
                                int64_t heads, int64_t kv_heads, int64_t d, int64_t longest, float* Q, float* O) {
  const int64_t qw = heads * d, kw = kv_heads * d, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt((float)d);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* src = QKV + b * ld;
      const float* c = C + P[b] * d;
      const float* s = S + P[b] * d;
      std::memcpy(Q + b * qw, src, qw * sizeof(float));
      for (int64_t h = 0; h < heads; ++h) rope(Q + b * qw + h * d, c, s, d);
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t row = R ? R[b] : b;
        float* k = K + ((row * kv_heads + g) * cols + P[b]) * d;
        std::memcpy(k, src + qw + g * d, d * sizeof(float));
        rope(k, c, s, d);
        std::memcpy(V + ((row * kv_heads + g) * cols + P[b]) * d, src + qw + kw + g * d, d * sizeof(float));
      }
    }
  });
  at::parallel_for(0, B * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(longest);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / heads, hd = t % heads;
      const int64_t off = (((R ? R[b] : b) * kv_heads) + hd / group) * cols * d;
      attend(Q + t * d, K + off, V + off, P[b] + 1, d, scale, sc.data(), O + t * d);
    }
  });
}

// Attention of B decode rows straight from their fused QKV output [B, (heads + 2 kv_heads) d]: rotary
// on each row's query and key at its position (cos/sin tables [positions, d]), the key and value
// written to cache row b at that position, then every query head over the row's positions [0, pos]
// (float32 cache [rows, kv_heads, cols, d]) -> [B, heads d]. Replaces the per-layer rotary ops, the
// cache's index_copy_ and an attention call.
torch::Tensor decode_rows_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                    torch::Tensor positions, torch::Tensor keys, torch::Tensor values,
                                    int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dtype() == torch::kFloat32 && qkv.dim() == 2 && qkv.stride(1) == 1, "qkv: [B, width] float32");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous(), "cos/sin: contiguous float32 tables");
  TORCH_CHECK(keys.dtype() == torch::kFloat32 && values.dtype() == torch::kFloat32 && keys.is_contiguous() &&
                  values.is_contiguous(), "cache: contiguous float32");
  const int64_t B = qkv.size(0), d = cos.size(1), qw = heads * d, kw = kv_heads * d;
  TORCH_CHECK(qkv.size(1) == qw + 2 * kw && keys.size(1) == kv_heads && keys.size(3) == d, "widths");
  TORCH_CHECK(B <= keys.size(0), "more decode rows than cache rows");
  const int64_t cols = keys.size(2), ld = qkv.stride(0);
  auto pos = positions.to(torch::kLong).contiguous();
  const int64_t* P = pos.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(P[b] >= 0 && P[b] < cols && P[b] < cos.size(0), "a row's position is outside the cache");
    longest = std::max(longest, P[b] + 1);
  }
  auto q = torch::empty({B, qw}, qkv.options());
  auto out = torch::empty({B, qw}, qkv.options());
  pybind11::gil_scoped_release no_gil;
  rows_attention_into(qkv.data_ptr<float>(), ld, B, cos.data_ptr<float>(), sin.data_ptr<float>(), P, nullptr,
                      keys.data_ptr<float>(), values.data_ptr<float>(), cols, heads, kv_heads, d, longest,
                      q.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

template <typename W>
static const W* ptr(const torch::Tensor& t) {
  return reinterpret_cast<const W*>(t.data_ptr());
}

using Tensors = std::vector<torch::Tensor>;

// a linear weight's input width: [out, in], int8 packed as [blocks, in / 4, 16, 4], int4 as
// [pairs, in / 32, 8, 16, 4]
static int64_t hidden_in(const torch::Tensor& w) {
  return w.dim() == 2 ? w.size(1) : w.dim() == 4 ? w.size(1) * 4 : w.size(1) * Q4_GROUP;
}

// one linear of a one-row step: float32 and bfloat16 weights through the GEMV, int8 and int4 (packed
// by q8_pack / q4_pack, with their scales) through qmatmul on the row quantized as q_linear does
struct RowLinear {
  QuantRows q;
  void operator()(const float* x, const torch::Tensor& w, const torch::Tensor* scale, float* y, int64_t out,
                  int64_t in) {
    if (w.scalar_type() == torch::kFloat32) {
      gemv_into(x, ptr<float>(w), y, out, in);
    } else if (w.scalar_type() == torch::kBFloat16) {
      gemv_into(x, ptr<uint16_t>(w), y, out, in);
    } else {
      qmatmul(x, 1, in, w, *scale, y, out, out, q);
    }
  }
};

// W: the norms' and the cache's dtype (float32 or bfloat16); each linear's weight is W or int8/int4
// with its scale in `scales` (four a layer: QKV, output, gate-up, down; empty without them)
template <typename W>
static void decode_row_impl(float* X, const Tensors& in_norm, const Tensors& qkv_w, const Tensors& qkv_b,
                            const Tensors& o_w, const Tensors& post_norm, const Tensors& gate_up_w,
                            const Tensors& down_w, const Tensors& scales, const Tensors& keys,
                            const Tensors& values, const float* C, const float* S, int64_t pos, int64_t hidden,
                            int64_t heads, int64_t kv_heads, int64_t d, float eps) {
  RowLinear linear;
  auto scale_of = [&](int64_t l, int which) { return scales.empty() ? nullptr : &scales[4 * l + which]; };
  const int64_t layers = (int64_t)qkv_w.size();
  const int64_t qw = heads * d, kw = kv_heads * d, inter = hidden_in(down_w[0]), group = heads / kv_heads;
  const int64_t cols = keys[0].size(2), len = pos + 1;
  std::vector<float> h(hidden), qkv(qw + 2 * kw), attn(qw), gu(2 * inter), act(inter), y(std::max(hidden, inter));
  std::vector<float> scores(heads * len);
  const float scale = 1.0f / std::sqrt((float)d);
  for (int64_t l = 0; l < layers; ++l) {
    rms_norm(X, ptr<W>(in_norm[l]), h.data(), hidden, eps);
    linear(h.data(), qkv_w[l], scale_of(l, 0), qkv.data(), qw + 2 * kw, hidden);
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
    linear(attn.data(), o_w[l], scale_of(l, 1), y.data(), hidden, qw);
    for (int64_t i = 0; i < hidden; ++i) X[i] += y[i];
    rms_norm(X, ptr<W>(post_norm[l]), h.data(), hidden, eps);
    linear(h.data(), gate_up_w[l], scale_of(l, 2), gu.data(), 2 * inter, hidden);
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gu[i];
      act[i] = g / (1.0f + std::exp(-g)) * gu[inter + i];
    }
    linear(act.data(), down_w[l], scale_of(l, 3), y.data(), hidden, inter);
    for (int64_t i = 0; i < hidden; ++i) X[i] += y[i];
  }
}

// One decode step of one row through every layer of a Llama/Mistral/Qwen2 decoder: the residual
// stream x [hidden] (float32) is updated in place. Norms, the QKV bias and the cache are float32 or
// bfloat16; the linear weights are that dtype too, or int8 packed by q8_pack with their float32
// scales in `scales` (QKV, output, gate-up, down of each layer in turn); sums are float32. The new
// key and value go to row 0, position `pos` of each layer's cache [rows, kv_heads, cols, d], and the
// query attends over positions [0, pos]. cos/sin: float32 rows for `pos`.
void decode_row(torch::Tensor x, std::vector<torch::Tensor> in_norm, std::vector<torch::Tensor> qkv_w,
                std::vector<torch::Tensor> qkv_b, std::vector<torch::Tensor> o_w,
                std::vector<torch::Tensor> post_norm, std::vector<torch::Tensor> gate_up_w,
                std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> scales,
                std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor cos,
                torch::Tensor sin, int64_t pos, int64_t heads, int64_t kv_heads, double eps) {
  const int64_t layers = (int64_t)qkv_w.size();
  TORCH_CHECK(layers > 0 && x.is_contiguous() && x.dtype() == torch::kFloat32, "x: contiguous float32");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32, "cos/sin: float32");
  TORCH_CHECK(qkv_b.empty() || (int64_t)qkv_b.size() == layers, "qkv biases: none or one per layer");
  TORCH_CHECK(scales.empty() || (int64_t)scales.size() == 4 * layers, "int8/int4 scales: none or four per layer");
  TORCH_CHECK((int64_t)keys.size() == layers && (int64_t)values.size() == layers, "one cache tensor per layer");
  TORCH_CHECK(pos >= 0 && pos < keys[0].size(2) && keys[0].size(0) > 0, "position beyond the cache (or no row)");
  const auto dtype = keys[0].scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "cache: float32 or bfloat16");
  for (int64_t l = 0; l < layers; ++l) {
    for (auto* t : {&in_norm[l], &post_norm[l], &keys[l], &values[l]})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == dtype, "norms and cache: contiguous, one dtype");
    int which = 0;
    for (auto* t : {&qkv_w[l], &o_w[l], &gate_up_w[l], &down_w[l]}) {
      TORCH_CHECK(t->is_contiguous(), "weights: contiguous");
      if (t->scalar_type() == torch::kByte) {
        const auto kind = scales.empty() ? torch::kByte : scales[4 * l + which].scalar_type();
        TORCH_CHECK(has_vnni() && (kind == torch::kFloat32 || kind == torch::kHalf),
                    "int8/int4 weights: AVX512-VNNI and their scales");
      } else {
        TORCH_CHECK(t->scalar_type() == dtype, "weights: the cache's dtype or int8");
      }
      ++which;
    }
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
    decode_row_impl<float>(X, in_norm, qkv_w, qkv_b, o_w, post_norm, gate_up_w, down_w, scales, keys, values, C, S,
                           pos, hidden, heads, kv_heads, d, (float)eps);
  else
    decode_row_impl<uint16_t>(X, in_norm, qkv_w, qkv_b, o_w, post_norm, gate_up_w, down_w, scales, keys, values, C,
                              S, pos, hidden, heads, kv_heads, d, (float)eps);
}

// One step of B rows through every layer of a decoder with int8 or int4 linear weights, the residual stream
// x [B, hidden] (float32) updated in place: row b is a token at positions[b] of cache row
// cache_rows[b], so decode rows (one each in their own cache row) and prompt chunks (consecutive
// positions of one cache row, causal) share the step; each integer matmul takes all B rows at once. A
// batched step's ~8 calls a layer from Python (norms, matmuls, attention, SwiGLU, residual adds)
// become one call a step. Norms, the QKV bias, the cache and cos/sin tables ([positions, d]): float32.
void decode_rows_q8(torch::Tensor x, std::vector<torch::Tensor> in_norm, std::vector<torch::Tensor> qkv_w,
                    std::vector<torch::Tensor> qkv_b, std::vector<torch::Tensor> o_w,
                    std::vector<torch::Tensor> post_norm, std::vector<torch::Tensor> gate_up_w,
                    std::vector<torch::Tensor> down_w, std::vector<torch::Tensor> scales,
                    std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor cos,
                    torch::Tensor sin, torch::Tensor positions, torch::Tensor cache_rows, int64_t heads,
                    int64_t kv_heads, double eps) {
  const int64_t layers = (int64_t)qkv_w.size();
  TORCH_CHECK(has_vnni(), "int8 and int4 weights need AVX512-VNNI");
  TORCH_CHECK(layers > 0 && x.dim() == 2 && x.is_contiguous() && x.dtype() == torch::kFloat32,
              "x: [B, hidden] contiguous float32");
  TORCH_CHECK((int64_t)scales.size() == 4 * layers, "int8/int4 scales: four per layer");
  TORCH_CHECK((int64_t)keys.size() == layers && (int64_t)values.size() == layers, "one cache tensor per layer");
  TORCH_CHECK(qkv_b.empty() || (int64_t)qkv_b.size() == layers, "qkv biases: none or one per layer");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous(), "cos/sin: contiguous float32 tables");
  for (int64_t l = 0; l < layers; ++l) {
    for (auto* t : {&in_norm[l], &post_norm[l], &keys[l], &values[l]})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat32, "norms and cache: float32");
    for (auto* t : {&qkv_w[l], &o_w[l], &gate_up_w[l], &down_w[l]})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kByte, "weights: int8 or int4 (q8_pack, q4_pack)");
    if (!qkv_b.empty()) TORCH_CHECK(qkv_b[l].is_contiguous() && qkv_b[l].scalar_type() == torch::kFloat32, "bias");
  }
  const int64_t B = x.size(0), H = x.size(1), d = cos.size(1), qw = heads * d, kw = kv_heads * d;
  const int64_t nqkv = qw + 2 * kw, inter = hidden_in(down_w[0]), cols = keys[0].size(2);
  TORCH_CHECK(hidden_in(qkv_w[0]) == H, "x's width does not match the weights");
  auto pos = positions.to(torch::kLong).contiguous();
  auto crow = cache_rows.to(torch::kLong).contiguous();
  TORCH_CHECK(pos.numel() == B && crow.numel() == B, "one position and one cache row per row");
  const int64_t* P = pos.data_ptr<int64_t>();
  const int64_t* R = crow.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(P[b] >= 0 && P[b] < cols && P[b] < cos.size(0), "a row's position is outside the cache");
    TORCH_CHECK(R[b] >= 0 && R[b] < keys[0].size(0), "a row's cache row is outside the cache");
    longest = std::max(longest, P[b] + 1);
  }
  float* X = x.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
  std::vector<float> h(B * H), qkv(B * nqkv), q(B * qw), attn(B * qw), gu(B * 2 * inter), act(B * inter);
  std::vector<float> y(B * H);
  QuantRows qr;
  auto norm_rows = [&](const torch::Tensor& w) { norm_rows_into(X, w.data_ptr<float>(), h.data(), B, H, (float)eps); };
  auto matmul = [&](const float* in, int64_t width, const torch::Tensor& w, const torch::Tensor& sc, float* out,
                    int64_t n) {
    qmatmul(in, B, width, w, sc, out, n, n, qr);
  };
  auto add_y = [&]() {
    for (int64_t i = 0; i < B * H; ++i) X[i] += y[i];
  };
  for (int64_t l = 0; l < layers; ++l) {
    norm_rows(in_norm[l]);
    matmul(h.data(), H, qkv_w[l], scales[4 * l], qkv.data(), nqkv);
    if (!qkv_b.empty()) {
      const float* bias = qkv_b[l].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < nqkv; ++i) qkv[b * nqkv + i] += bias[i];
    }
    rows_attention_into(qkv.data(), nqkv, B, C, S, P, R, keys[l].data_ptr<float>(), values[l].data_ptr<float>(),
                        cols, heads, kv_heads, d, longest, q.data(), attn.data());
    matmul(attn.data(), qw, o_w[l], scales[4 * l + 1], y.data(), H);
    add_y();
    norm_rows(post_norm[l]);
    matmul(h.data(), H, gate_up_w[l], scales[4 * l + 2], gu.data(), 2 * inter);
    silu_mul_rows_into(gu.data(), act.data(), B, inter);
    matmul(act.data(), inter, down_w[l], scales[4 * l + 3], y.data(), H);
    add_y();
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
            functions=[
                "gemv",
                "decode_row",
                "q_linear",
                "rms_norm_rows",
                "silu_mul",
                "decode_rows_attention",
                "decode_rows_q8",
            ],
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
    gate-up, down, int8 scales or []), `kv` the slot cache (row 0), `shape` (heads, kv_heads, eps)."""
    module = kernel()
    assert module is not None
    heads, kv_heads, eps = shape
    module.decode_row(x, *weights, kv.keys, kv.values, cos, sin, pos, heads, kv_heads, eps)


def quantized_unavailable() -> str | None:
    """Why int8 and int4 weights cannot run here (None: they can): the compiled kernels and AVX512-VNNI."""
    reason = wanted()
    if reason is None and "avx512_vnni" not in _cpu_flags():
        reason = "this CPU has no AVX512-VNNI"
    if reason is None and kernel() is None:
        reason = "the compiled kernels did not build (see the warning above)"
    return reason


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def q8_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] as int8 per output channel for `q_linear` and `decode_row`: (packed
    uint8 [ceil(N / 32) * 2, K / 4, 16, 4] holding q + 128, float32 scales [N]) with
    weight ~ q * scale[:, None], |q| <= 127. K must be a multiple of 32."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"int8 weights need an input width that is a multiple of 32 (got {k})")
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int16).add_(128).to(torch.uint8)
    padded = (n + 31) // 32 * 32
    if padded != n:
        q = torch.cat([q, q.new_full((padded - n, k), 128)])
    packed = q.view(padded // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return packed, scale.contiguous()


def q8_dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that a packed int8 weight stands for (tests, checks)."""
    blocks, quads = packed.shape[:2]
    q = packed.permute(0, 2, 1, 3).reshape(blocks * 16, quads * 4)[: scale.numel()]
    return (q.to(torch.int16) - 128).float() * scale[:, None]


Q4_GROUP = 32  # inputs per int4 scale (llama.cpp's q4_0 block)


def q4_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] as int4 in groups of 32 inputs per output, scaled as llama.cpp's q4_0 is:
    d = the group's value of largest magnitude / -8 (float16), u = round(w / d) + 8 clamped to 0..15,
    so w ~ (u - 8) * d. Returns (packed uint8 [ceil(N / 32), K / 32, 8, 16, 4]: per 32 outputs and
    quad of inputs, the first 16 outputs' u in the low nibbles and the next 16's in the high ones, as
    q4_tile reads them; scales float16 [ceil(N / 32), K / 32, 2, 16]). K must be a multiple of 32."""
    n, k = weight.shape
    if k % Q4_GROUP:
        raise ValueError(f"int4 weights need an input width that is a multiple of {Q4_GROUP} (got {k})")
    padded, groups = (n + 31) // 32 * 32, k // Q4_GROUP
    w = weight.detach().float().view(n, groups, Q4_GROUP)
    extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))  # signed: it maps to -8 exactly
    d = (extreme / -8).to(torch.float16)
    d = torch.where(d == 0, torch.ones_like(d), d)  # an all-zero group (or one below float16's range)
    u = (w / d.float()).round_().add_(8).clamp_(0, 15).to(torch.uint8)
    if padded != n:
        u = torch.cat([u, u.new_full((padded - n, groups, Q4_GROUP), 8)])
        d = torch.cat([d, d.new_ones((padded - n, groups, 1))])
    # [pair, half (A / B), 16 outputs, group, quad, j] -> [pair, group, quad, 16 outputs, j]
    halves = u.view(padded // 32, 2, 16, groups, 8, 4).permute(0, 1, 3, 4, 2, 5)
    packed = (halves[:, 0] | (halves[:, 1] << 4)).contiguous()
    scales = d.view(padded // 32, 2, 16, groups).permute(0, 3, 1, 2).contiguous()
    return packed, scales


def q4_dequantize(packed: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """The float32 weight [n, K] that a q4_pack weight stands for (tests, checks)."""
    pairs, groups = packed.shape[:2]
    halves = torch.stack([packed & 15, packed >> 4], dim=1)  # [pair, half, group, quad, 16, j]
    u = halves.permute(0, 1, 4, 2, 3, 5).reshape(pairs * 32, groups, Q4_GROUP)
    d = scales.permute(0, 2, 3, 1).reshape(pairs * 32, groups, 1).float()
    return ((u.to(torch.int16) - 8).float() * d).reshape(pairs * 32, groups * Q4_GROUP)[:n]


def q_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] (float32) @ an int8 (q8_pack) or int4 (q4_pack) weight of n outputs -> [M, n]: x is
    quantized per row in groups (int8: 128, 64 or 32 inputs; int4: 32) and multiplied in int32 with
    AVX512-VNNI (the kernel must be loaded)."""
    module = kernel()
    assert module is not None
    y = module.q_linear(x.contiguous(), packed, scale, n)
    return y if bias is None else y.add_(bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of every row of x [N, H] (float32; the kernel must be loaded)."""
    module = kernel()
    assert module is not None
    return module.rms_norm_rows(x.contiguous(), weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from the fused gate-up output [N, 2I] -> [N, I] (float32)."""
    module = kernel()
    assert module is not None
    return module.silu_mul(gate_up.contiguous())


def decode_rows_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    kv: tuple[torch.Tensor, ...],
    heads: tuple[int, int],
) -> torch.Tensor:
    """Rotary, cache write and attention of B decode rows from their QKV output [B, width]: row b's
    key and value go to cache row b at positions[b]; (keys, values) = kv; heads = (heads, kv_heads)."""
    module = kernel()
    assert module is not None
    return module.decode_rows_attention(qkv, cos, sin, positions, kv[0], kv[1], heads[0], heads[1])


def decode_rows_q8(
    x: torch.Tensor,
    weights: list[list[torch.Tensor]],
    kv: Any,
    tables: tuple[torch.Tensor, torch.Tensor],
    rows: tuple[torch.Tensor, torch.Tensor],
    shape: tuple[int, int, float],
) -> None:
    """A step of B rows through every int8 layer in one call, in place on x [B, hidden] (float32):
    `weights` as decode_row's (scales included), `kv` the slot cache, `tables` the (cos, sin) tables
    by position, `rows` each row's (positions, cache rows), `shape` (heads, kv_heads, eps)."""
    module = kernel()
    assert module is not None
    heads, kv_heads, eps = shape
    module.decode_rows_q8(x, *weights, kv.keys, kv.values, *tables, *rows, heads, kv_heads, eps)
