r"""Time to first token of a chat's second turn about the same image, against its first turn.

    python benchmarks/multiturn_ttft.py --model-path M --conversations 4

In-process, one conversation at a time: turn 1 is an image and a question (up to 64 new tokens,
greedy, stopping at EOS); turn 2 repeats the conversation (the same image, turn 1's question and
its answer, stripped as LLaVA's web demo keeps it) and asks another question, as a chat client
sends it. Run with the prefix cache on (the default) and off; prints
the median TTFT of each turn and turn 2 / turn 1 (issue 12 asks for <= 0.30).

`--answer-regex RX` constrains both turns' answers to a regular expression (e.g. ' [a-z]{2,6}( [a-z]{2,6}){2,5}\.'):
a random-weight checkpoint's free answers are bytes that are not valid UTF-8, which no client can
send back as they were generated; answers of words round-trip as a trained model's do. Prints the
prompt tokens each turn read (the rest came from the prefix cache).
"""

from __future__ import annotations

import argparse
import hashlib
import queue
import statistics
import time

import torch

from llava_serve.engine.constraint import Constraint
from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request, RequestOutput
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.tools.bench_workload import QUESTIONS, make_requests

READ: list[int] = []  # prompt tokens each turn read (not taken from the prefix cache)


def ask(eng: BatchEngine, lm, messages: list[dict], image, tokens: int, regex: str | None = None) -> tuple[float, str]:
    """(TTFT in seconds, the answer) for one turn."""
    key = hashlib.sha256(image.tobytes()).hexdigest()
    prompt = lm.encode(lm.build_prompt(messages), [image], [key])
    outputs: queue.Queue[RequestOutput] = queue.Queue()
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens)
    req = Request(prompt=prompt, params=params, sink=outputs.put)
    if regex is not None:
        req.constraint = Constraint({"type": "regex", "pattern": regex}, lm.tokenizer)
    prefixes = getattr(eng.runner, "prefixes", None)
    reused = prefixes.reused_tokens if prefixes is not None else 0
    start = time.perf_counter()
    eng.submit(req)
    out = outputs.get(timeout=600)
    READ.append(len(req.prompt.input_ids) - ((prefixes.reused_tokens if prefixes is not None else 0) - reused))
    ttft = time.perf_counter() - start
    while not out.finished:
        out = outputs.get(timeout=600)
    return ttft, out.text


def conversation(eng: BatchEngine, lm, image, i: int, tokens: int, regex: str | None) -> tuple[float, float]:
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % 8]}]}]
    ttft1, answer = ask(eng, lm, first, image, tokens, regex)
    second = [
        *first,
        {"role": "assistant", "content": answer.strip()},
        {"role": "user", "content": QUESTIONS[(i + 3) % 8]},
    ]
    ttft2, _ = ask(eng, lm, second, image, tokens, regex)
    return ttft1, ttft2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-path", required=True)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--answer-regex", default=None, help="constrain the answers to this regular expression")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(LoadOptions(model_path=args.model_path, device="cpu"))
    for label, cache_bytes in (("prefix cache on", 256 << 20), ("prefix cache off", 0)):
        eng = BatchEngine(lm, max_running=4, max_waiting=8, prefix_cache_bytes=cache_bytes).start()
        ask(
            eng,
            lm,
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
            make_requests(1, 999)[0].image(),
            4,
        )  # warm-up
        READ.clear()
        pairs = [
            conversation(eng, lm, req.image(), i, args.tokens, args.answer_regex)
            for i, req in enumerate(make_requests(args.conversations, 77 + (cache_bytes > 0)))
        ]
        prefixes = getattr(eng.runner, "prefixes", None)
        hits = prefixes.reused_tokens if prefixes is not None else 0
        answers = prefixes.answer_matches if prefixes is not None else 0
        eng.shutdown()
        print(f"{label}: {hits} prompt tokens reused from the prefix cache ({answers} answers matched by their text)")
        t1 = statistics.median(a for a, _ in pairs) * 1000
        t2 = statistics.median(b for _, b in pairs) * 1000
        ratios = ", ".join(f"{b / a:.2f}" for a, b in pairs)
        read1, read2 = statistics.median(READ[0::2]), statistics.median(READ[1::2])
        print(f"{label}: prompt tokens read (median): turn 1 {read1:g}, turn 2 {read2:g}; turn 2 per conversation: "
              + ", ".join(str(n) for n in READ[1::2]))  # fmt: skip
        print(f"{label}: TTFT turn 1 {t1:.0f} ms, turn 2 {t2:.0f} ms (median), turn2/turn1 per conversation: {ratios}")


if __name__ == "__main__":
    main()
