"""Where a BatchEngine decode step spends its time, next to a plain `model.generate` step.

    python benchmarks/profile_engine.py --model-path M --rows 1,16 --tokens 32 [--runner transformers]

Runs the engine synchronously in this thread (no HTTP, no worker), so cProfile and
torch.profiler see everything; prints per-phase wall times (median over steps), the torch ops of
one decode step, and the same for HF generate with the same rows as one static batch.
`--runner` picks the engine's runner (`decoder`, the fast path; `transformers`, the old one).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.tools.bench_workload import make_requests


def engine_requests(lm, n: int, tokens: int, round_id: int) -> list[Request]:
    out = []
    for i, r in enumerate(make_requests(n, round_id)):
        enc = lm.encode(r.prompt, [r.image()], [f"{round_id}-{n}-{i}"])
        params = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
        out.append(Request(prompt=enc, params=params, sink=lambda o: None))
    return out


class PhaseTimer:
    """Wraps methods of the runner/engine and sums wall time per phase for each step."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                # a step that reads a prompt is timed apart from decode-only steps
                mixed = bool(a) and getattr(a[0], "prefill", None) is not None
                self.times[label + (" (with a prompt)" if mixed else "")].append(time.perf_counter() - t)

        setattr(obj, name, timed)


def run_engine(
    lm, n: int, tokens: int, round_id: int, profile_steps: int, runner: str, max_running: int = 0, quantization=None
) -> None:
    eng = BatchEngine(
        lm,
        max_running=max_running or max(n, 1),
        max_waiting=64,
        runner=runner,
        prefix_cache_bytes=0,
        quantization=quantization,
    )
    timer = PhaseTimer()
    for obj, name, label in [
        (eng.runner, "run", "forward"),
        (eng.runner, "encode_images", "vision"),
        (eng, "_postprocess", "postprocess (text, emit)"),
    ]:
        timer.wrap(obj, name, label)
    for req in engine_requests(lm, n, tokens, round_id):
        eng.submit(req)
    eng._drain(block=False)
    steps: list[float] = []
    full_steps = 0  # decode-only steps with every row running; the profile looks at one of those
    with torch.inference_mode():
        while eng.scheduler.has_work():
            full_steps += len(eng.scheduler.running) == n and not eng.scheduler.prefilling
            t = time.perf_counter()
            if full_steps == 3 and profile_steps:
                with torch.profiler.profile() as prof:
                    for _ in range(profile_steps):
                        eng.step()
                print_ops(prof, profile_steps, f"BatchEngine decode step, {n} rows")
            else:
                eng.step()
            steps.append(time.perf_counter() - t)
    total = sum(steps)
    print(
        f"\nBatchEngine ({eng.runner.name} runner) {n} rows x {tokens} tokens: {n * tokens / total:.1f} tok/s, "
        f"step median "
        f"{1000 * statistics.median(steps[1:]):.1f} ms, first step {1000 * steps[0]:.0f} ms"
    )
    for label, values in timer.times.items():
        print(
            f"  {label:<28} n={len(values):<4} median {1000 * statistics.median(values):7.2f} ms"
            f"  total {sum(values):6.2f} s"
        )


def run_static(lm, n: int, tokens: int, round_id: int, profile_steps: int) -> None:
    from llava_serve.tools.bench_static import run_static as static

    a = static(lm, make_requests(n, round_id), tokens)
    print(
        f"\nstatic model.generate {n} rows x {tokens}: {a['tokens'] / a['wall_s']:.1f} tok/s, "
        f"prefill {a['ttft_s']:.2f} s, step {a['step_ms']:.1f} ms"
    )
    if profile_steps:
        with torch.profiler.profile() as prof:
            static(lm, make_requests(n, round_id + 1), profile_steps + 1)
        print_ops(prof, profile_steps + 1, f"static generate (prefill + {profile_steps} steps), {n} rows")


def print_ops(prof, steps: int, title: str) -> None:
    events = prof.key_averages()
    total_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"\n--- {title}: {total_ops / steps:.0f} aten op calls per step ---")
    print(events.table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-path", required=True)
    p.add_argument("--rows", default="1,16")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--profile-steps", type=int, default=0)
    p.add_argument("--static", action="store_true", help="also time the static model.generate batch")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--runner", default="auto", choices=["auto", "decoder", "transformers"])
    p.add_argument("--quantization", default=None, choices=["int8"], help="the engine's int8 weights")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def model():  # int8 weights replace the float ones: a fresh model for each engine then
        return load_model(LoadOptions(model_path=args.model_path, device="cpu"))

    lm = model()
    rows = [int(x) for x in args.rows.split(",")]
    # warm-up; prepacking happens once per model, sized for the largest batch, as in the worker
    run_engine(lm, 2, 4, -1, 0, args.runner, max_running=max(rows), quantization=args.quantization)
    for i, n in enumerate(rows):
        lm = model() if args.quantization else lm
        run_engine(lm, n, args.tokens, i, args.profile_steps, args.runner, max(rows), args.quantization)
        if args.static:
            run_static(lm, n, args.tokens, i, args.profile_steps)


if __name__ == "__main__":
    main()
