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

static inline float dot_tail(const float* w, const float* x, int64_t k0, int64_t in, __m512 acc) {
  if (k0 < in) {
    const __mmask16 m = (__mmask16)((1u << (in - k0)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k0), _mm512_maskz_loadu_ps(m, x + k0), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y[1, out] = x[1, in] @ w[out, in].T: each thread a contiguous block of rows, four rows a pass.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 2 && x.numel() == w.size(1), "shapes");
  const int64_t out = w.size(0), in = w.size(1), body = in / 16 * 16;
  auto y = torch::empty({1, out}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, (out + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t r = q * 4;
      if (r + 4 <= out) {
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
      } else {
        for (int64_t row = r; row < out; ++row) {
          const float* wr = W + row * in;
          __m512 a = _mm512_setzero_ps();
          for (int64_t k = 0; k < body; k += 16)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(X + k), a);
          Y[row] = dot_tail(wr, X, body, in, a);
        }
      }
    }
  });
  return y;
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
            functions=["gemv"],
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
