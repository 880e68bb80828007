"""A burst of clients in process: N requests (own image each) submitted at once, stepped to the end.

    python benchmarks/burst.py --model-path /tmp/bench-llava --clients 16 --tokens 64 --threads 1

Prints tokens/s over the whole burst, the number of engine steps and the median time to first
token: what the scheduler's prefill budget and the slot cache's growth decide. For an A/B of two
versions of the code, run it twice with `PYTHONPATH` pointing at each tree, alternating.
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
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(LoadOptions(model_path=args.model_path))
    for rnd in range(args.rounds):
        eng = BatchEngine(lm, max_running=args.clients, adapt_threads=False, prefix_cache_bytes=0)
        reqs = engine_requests(lm, args.clients, args.tokens, round_id=100 + rnd)
        first: dict[int, float] = {}
        start = time.perf_counter()
        for req in reqs:
            eng.submit(req)
        eng._drain(block=False)
        steps = 0
        while eng.scheduler.has_work():
            eng.step()
            steps += 1
            for req in reqs:
                if req.output_ids and id(req) not in first:
                    first[id(req)] = time.perf_counter() - start
        wall = time.perf_counter() - start
        print(
            f"{args.clients} clients x {args.tokens} tokens: {args.clients * args.tokens / wall:.1f} tok/s, "
            f"{wall:.2f} s, {steps} steps, TTFT p50 {statistics.median(first.values()):.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
