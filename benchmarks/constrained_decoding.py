"""What structured output costs: decode throughput at N concurrent requests, with and without a JSON
schema grammar, in the batch engine in process (no HTTP), rounds alternating so noise hits both.

    python benchmarks/constrained_decoding.py --model-path DIR [--clients 16] [--tokens 64] [--rounds 3]

Both arms sample at temperature 1 with the same seeds and `ignore_eos` (so every request runs its
full token budget); the constrained arm follows a schema that never ends early (an array of
strings), so each of its steps pays for the grammar mask. Prints tokens/s per arm and the ratio.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time

from tqdm import tqdm

from llava_serve.engine.constraint import Constraint
from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request, RequestOutput
from llava_serve.models.loader import LoadOptions, load_model

SCHEMA = {"type": "json_schema", "schema": {"type": "array", "items": {"type": "string"}}}


def one_round(engine: BatchEngine, lm, clients: int, tokens: int, constrained: bool) -> float:  # type: ignore[no-untyped-def]
    done: queue.Queue[RequestOutput] = queue.Queue()
    prompt = lm.encode(lm.build_prompt([{"role": "user", "content": "List some colours as JSON."}]), [])

    def sink(out: RequestOutput) -> None:
        if out.finished:
            done.put(out)

    requests = []
    for i in range(clients):  # grammars are compiled before the clock starts, as the worker compiles
        params = SamplingParams(temperature=1.0, seed=i, max_new_tokens=tokens, ignore_eos=True)
        requests.append(Request(prompt=prompt, params=params, sink=sink))  # them off the engine thread
        requests[-1].constraint = Constraint(SCHEMA, lm.tokenizer) if constrained else None
    start = time.perf_counter()
    for req in requests:
        engine.submit(req)
    outs = [done.get(timeout=600) for _ in range(clients)]
    elapsed = time.perf_counter() - start
    assert all(o.error is None for o in outs), [o.error for o in outs if o.error]
    return sum(o.completion_tokens for o in outs) / elapsed


def mask_cost(lm, steps: int = 400) -> float:  # type: ignore[no-untyped-def]
    """Seconds per step that one constrained row adds: fill and apply the mask, feed the token."""
    import torch

    constraint = Constraint(SCHEMA, lm.tokenizer)
    row = torch.randn(lm.model.get_output_embeddings().weight.shape[0])
    start = time.perf_counter()
    for _ in range(steps):
        masked = constraint.mask(row)
        constraint.consume(int(masked.argmax()))
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    lm = load_model(LoadOptions(model_path=args.model_path, device="cpu"))
    engine = BatchEngine(lm, max_running=args.clients, max_waiting=args.clients).start()
    try:
        one_round(engine, lm, args.clients, 8, False)  # warm up
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for constrained in (False, True):
                rates[constrained].append(one_round(engine, lm, args.clients, args.tokens, constrained))
    finally:
        engine.shutdown()
    free, json_ = statistics.median(rates[False]), statistics.median(rates[True])
    per_row = mask_cost(lm)
    print(f"grammar work per constrained row per step (mask + consume), measured alone: {per_row * 1e6:.0f} us")
    print(f"{args.clients} clients x {args.tokens} tokens, median of {args.rounds} rounds:")
    print(f"  unconstrained {free:.1f} tok/s   json schema {json_:.1f} tok/s   ratio {json_ / free:.3f}")
    print(f"  rounds: unconstrained {[round(r, 1) for r in rates[False]]}, json {[round(r, 1) for r in rates[True]]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
