"""The bar to beat: the benchmark's requests as one static batch through a single `model.generate`.

`python -m llava_serve.tools.bench_static --model-path M` loads the model once, then reads one JSON
command a line on stdin ({"n", "round", "max_new_tokens"}) and answers each with one line
`BENCH-STATIC {json}` on stdout: left-padded prompts and pixel_values from the processor, greedy,
EOS ignored. Time counts from the processor call to the last token, so it includes image
preprocessing as the workers' figures do (but no HTTP); TTFT is when the first token's logits
reach the logits processors (the end of the batched prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from llava_serve.tools.bench_child import STATIC_MARK as MARK
from llava_serve.tools.bench_workload import BenchRequest, make_requests


class FirstStep:
    """A no-op logits processor that notes when generation reaches its first token."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def run_static(lm, requests: Sequence[BenchRequest], max_new_tokens: int) -> dict:
    from transformers import LogitsProcessorList

    processor = lm.processor
    token = getattr(processor, "image_token", "<image>")
    prompts = [r.prompt.replace("<image>", token) for r in requests]
    images = [r.image() for r in requests]
    first = FirstStep()
    pad = lm.tokenizer.pad_token_id
    start = time.perf_counter()
    inputs = processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    inputs = {k: v.to(lm.device) for k, v in inputs.items()}
    with torch.inference_mode():
        out = lm.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[],  # ignore EOS, as the workers' requests do
            pad_token_id=pad if pad is not None else 0,
            logits_processor=LogitsProcessorList([first]),
        )
    wall = time.perf_counter() - start
    new_tokens = out[:, inputs["input_ids"].shape[1] :].numel()
    ttft = (first.at or start) - start
    return {
        "requests": len(requests),
        "tokens": int(new_tokens),
        "wall_s": wall,
        "ttft_s": ttft,
        "step_ms": 1000 * (wall - ttft) / max(1, max_new_tokens - 1),
        "padded_prompt_tokens": int(inputs["input_ids"].shape[1]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_serve.tools.bench_static", description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from llava_serve.models.loader import LoadOptions, load_model

    lm = load_model(LoadOptions(model_path=args.model_path, device=args.device))
    print(MARK + json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        requests = make_requests(cmd["n"], cmd.get("round", 0))
        print(MARK + json.dumps(run_static(lm, requests, cmd["max_new_tokens"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
