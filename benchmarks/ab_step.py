"""A/B of the engine's runners on one machine moment: decode steps of each, interleaved.

    python benchmarks/ab_step.py --model-path M --rows 1,16 --steps 24
    python benchmarks/ab_step.py --model-path M --runners decoder --dtypes float32,bfloat16

On a machine shared with other work, runs a minute apart can differ by 2x; here each runner gets
the same requests and their decode steps alternate (A, B, A, B, ...), so drift hits both alike.
Prints per runner and batch size the median wall and CPU time of a decode-only step, and B/A.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.profile_engine import engine_requests
from llava_serve.engine.engine import BatchEngine
from llava_serve.models.loader import LoadOptions, load_model


def fill(eng: BatchEngine, lm, n: int, tokens: int) -> None:
    """Submit n requests and step until all of them decode."""
    for req in engine_requests(lm, n, tokens, round_id=7):
        eng.submit(req)
    eng._drain(block=False)
    while len(eng.scheduler.running) < n:
        eng.step()


def measure(engines: dict[str, BatchEngine], steps: int) -> dict[str, tuple[list[float], list[float]]]:
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in engines}
    for _ in range(steps):
        for name, eng in engines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            eng.step()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return times


def drain(eng: BatchEngine) -> None:
    for req in eng.scheduler.all_requests():
        eng._leave(req, "abort")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-path", required=True)
    p.add_argument("--rows", default="1,16")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--runners", default="transformers,decoder")
    p.add_argument("--dtypes", default="float32", help="weights' dtypes (each its own model), e.g. float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(x) for x in args.rows.split(",")]
    engines: dict[str, BatchEngine] = {}
    models = {}
    for dtype in args.dtypes.split(","):
        lm = models[dtype] = load_model(LoadOptions(model_path=args.model_path, device="cpu", dtype=dtype))
        # the decoder runner first: the transformers path swaps the model's linears for prepacked ones,
        # which the decoder runner then refuses
        for runner in sorted(args.runners.split(","), key=lambda n: n != "decoder"):
            name = runner if dtype == "float32" else f"{runner}/{dtype}"
            engines[name] = BatchEngine(
                lm, max_running=max(rows), runner=runner, adapt_threads=False, prefix_cache_bytes=0
            )
    names = list(engines)
    with torch.inference_mode():
        for n in rows:
            for name, eng in engines.items():
                fill(eng, models[name.partition("/")[2] or "float32"], n, args.steps + 64)
            times = measure(engines, args.steps)
            base = statistics.median(times[names[0]][0])
            for name in names:
                wall, cpu = (statistics.median(t) * 1000 for t in times[name])
                print(f"{n:3d} rows  {name:<13} step {wall:7.1f} ms wall  {cpu:7.1f} ms cpu  x{base * 1000 / wall:.2f}")
            for eng in engines.values():
                drain(eng)


if __name__ == "__main__":
    main()
