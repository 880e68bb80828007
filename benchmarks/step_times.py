"""Decode-step times of one request over its whole length, in process (no HTTP, no worker).

    python benchmarks/step_times.py --model-path /tmp/bench-llava --tokens 256 --threads 2 \
        [--dtype bfloat16 | --quantization int8 | --quantization int4]

Steps one request (its own image and prompt) to the end, twice, and prints the median step time
of each 32-step window: how a one-row step grows with the context. For an A/B of two versions of
the code, run it with `PYTHONPATH` pointing at each tree, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.profile_engine import engine_requests
from llava_serve.engine.engine import BatchEngine
from llava_serve.models.loader import LoadOptions, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantization", default=None, choices=["int8", "int4"])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(LoadOptions(model_path=args.model_path, dtype=args.dtype))
    eng = BatchEngine(lm, max_running=1, adapt_threads=False, prefix_cache_bytes=0, quantization=args.quantization)
    for rnd in range(args.rounds):
        req = engine_requests(lm, 1, args.tokens, round_id=200 + rnd)[0]
        eng.submit(req)
        eng._drain(block=False)
        times = []
        while eng.scheduler.has_work():
            start = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - start)
        windows = [times[a : a + 32] for a in range(1, len(times), 32)]
        cells = [f"{a * 32 + 1}-{a * 32 + len(w)}: {statistics.median(w) * 1e3:.1f}" for a, w in enumerate(windows)]
        print(f"round {rnd}, prompt {req.prompt_len} tokens, step ms by window: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
