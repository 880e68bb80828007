"""OpenVINO GenAI's continuous-batching pipeline, driven in-process as OpenVINO Model Server drives it.

`python -m llava_serve.tools.peers.openvino_runner --model-dir IR` loads a
`ContinuousBatchingPipeline` on the exported IR (the VLM path: vision encoder, embeddings,
language model with paged attention), then reads one JSON command a line on stdin
({"n", "round", "max_new_tokens"}) and answers each with one line `BENCH-OPENVINO {json}`.

A command adds the round's n requests at once (the same prompts and images as the workers get:
bench_workload.py) and runs the scheduler loop, `step()` until no request is left, reading every
request's new tokens after each step and stamping them, as the server's generation loop does
before it writes a chunk to the client. Image decoding counts, as it does for the workers.

Runs under the interpreter that has openvino-genai (the `peers` extra, or a venv of its own:
this module imports nothing of llava-serve but bench_child (stdlib only) and bench_workload, which needs
Pillow only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from llava_serve.tools.bench_child import OPENVINO_MARK as MARK
from llava_serve.tools.bench_workload import BenchRequest, make_requests


def load(model_dir: str, threads: int, max_seqs: int, kv_cache_gb: int):
    import openvino_genai as ov_genai

    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = kv_cache_gb
    scheduler.max_num_seqs = max_seqs
    # float32 like llava-serve: on an AMX CPU OpenVINO would otherwise run bf16 with a u8 KV cache
    props = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    vision = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    return ov_genai.ContinuousBatchingPipeline(model_dir, scheduler, "CPU", props, vision_encoder_properties=vision)


def image_tensor(request: BenchRequest):
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.asarray(request.image())[None])  # NHWC uint8, as GenAI's samples pass it


def run_round(pipe, requests: list[BenchRequest], max_new_tokens: int) -> dict:
    import openvino_genai as ov_genai

    config = ov_genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.ignore_eos = True
    config.do_sample = False
    config.apply_chat_template = False  # the prompt is already LLaVA's, as the workers get it
    start = time.perf_counter()
    handles = [pipe.add_request(i, r.prompt, [image_tensor(r)], config) for i, r in enumerate(requests)]
    streams: list[dict] = [
        {"frame_times": [], "frame_tokens": [], "completion_tokens": 0, "finish_reason": None} for _ in handles
    ]
    while pipe.has_non_finished_requests():
        pipe.step()
        _read_all(handles, streams, time.perf_counter() - start)
    _read_all(handles, streams, time.perf_counter() - start)
    wall = time.perf_counter() - start
    for handle, stream in zip(handles, streams, strict=True):
        stream["status"] = str(handle.get_status())
        stream["end"] = wall
    return {"wall_s": wall, "streams": streams}


def _read_all(handles: list, streams: list[dict], now: float) -> None:
    for handle, stream in zip(handles, streams, strict=True):
        if not handle.can_read():
            continue
        for output in handle.read().values():  # read() gives the tokens since the last read
            added = len(output.generated_ids)
            if added:
                stream["completion_tokens"] += added
                stream["frame_times"].append(now)
                stream["frame_tokens"].append(stream["completion_tokens"])
            if output.finish_reason is not None and str(output.finish_reason) != "GenerationFinishReason.NONE":
                stream["finish_reason"] = str(output.finish_reason).rsplit(".", 1)[-1].lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_serve.tools.peers.openvino_runner", description=__doc__)
    parser.add_argument("--model-dir", required=True, help="OpenVINO IR exported by optimum-cli")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seqs", type=int, default=32, help="requests decoded together at most")
    parser.add_argument("--kv-cache-gb", type=int, default=2)
    args = parser.parse_args(argv)
    pipe = load(args.model_dir, args.threads, args.max_seqs, args.kv_cache_gb)
    import openvino_genai

    print(MARK + json.dumps({"ready": True, "version": openvino_genai.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        requests = make_requests(cmd["n"], cmd.get("round", 0))
        print(MARK + json.dumps(run_round(pipe, requests, cmd["max_new_tokens"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
