"""The CPU matmul kernels a decode step can use for its weights, at the bench model's MLP shape.

    python benchmarks/linear_kernels.py [--rows 1,16] [--threads 2] [--weights 12]

Times one call on each of `--weights` distinct 2816x1024 weights (distinct, so they stream from
memory as a decode step's do): float32 and bfloat16 through `F.linear` and through oneDNN's packed
kernel (what the decoder runner uses), weight-only int8 (`aten._weight_int8pack_mm`, per-row
scales, float32 and bfloat16 input), and the project's int8 kernel (`cpu_gemv.q_linear`, what
`--quantization int8` runs; where it can be built). Prints ms per pass over all weights.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llava_serve.engine import cpu_gemv

OUT, IN = 2816, 1024


def timed(fn: Callable[[], object], calls: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1000


def kernels(weights: list[torch.Tensor], rows: int) -> dict[str, Callable[[], object]]:
    x = torch.randn(rows, IN)
    xb = x.bfloat16()
    wb = [w.bfloat16() for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, max(rows, 2)) for w in weights]
    packed_b = [torch.ops.mkldnn._reorder_linear_weight(w, max(rows, 2)) for w in wb]
    scales = [w.abs().amax(1) / 127 for w in weights]
    q = [torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8) for w, s in zip(weights, scales)]
    scales_b = [s.bfloat16() for s in scales]
    pointwise = torch.ops.mkldnn._linear_pointwise
    own = {}
    if cpu_gemv.quantized_unavailable() is None:
        q8 = [cpu_gemv.q8_pack(w) for w in weights]
        own["int8 llava-serve (VNNI)"] = lambda: [cpu_gemv.q_linear(x, pw, s, s.numel(), None) for pw, s in q8]
    return own | {
        "float32 F.linear": lambda: [F.linear(x, w) for w in weights],
        "float32 packed": lambda: [pointwise(x, p, None, "none", [], "") for p in packed],
        "bfloat16 F.linear": lambda: [F.linear(xb, w) for w in wb],
        "bfloat16 packed": lambda: [pointwise(xb, p, None, "none", [], "") for p in packed_b],
        "int8 (float32 input)": lambda: [torch.ops.aten._weight_int8pack_mm(x, w, s) for w, s in zip(q, scales)],
        "int8 (bfloat16 input)": lambda: [torch.ops.aten._weight_int8pack_mm(xb, w, s) for w, s in zip(q, scales_b)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=int, default=12)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(OUT, IN) for _ in range(args.weights)]
    print(f"{args.weights} weights of {OUT}x{IN}, {args.threads} threads, ms per pass")
    for rows in (int(r) for r in args.rows.split(",")):
        with torch.inference_mode():
            times = {name: timed(fn, args.calls) for name, fn in kernels(weights, rows).items()}
        print(f"{rows:3d} rows  " + "  ".join(f"{name} {ms:.2f}" for name, ms in times.items()))


if __name__ == "__main__":
    main()
