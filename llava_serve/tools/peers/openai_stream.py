"""The benchmark's requests as OpenAI chat completions (llama-server's `/v1/chat/completions`), streamed.

The same system prompt, image and question as the worker's requests; the image goes as a
`data:` URL before the text, as LLaVA's template puts `<image>` before the question. Greedy, EOS
ignored (`ignore_eos`, a llama-server extension), and `timings_per_token` so that every chunk says
how many tokens have been generated: a chunk can carry more than one token (text held back
mid-character), and the inter-token latencies are split over them as for the worker's frames.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence

import httpx

from llava_serve.tools.bench_client import Progress, Sampler, StreamResult, _no_progress, drive
from llava_serve.tools.bench_workload import SYSTEM, BenchRequest


def chat_body(request: BenchRequest, max_new_tokens: int, model: str = "bench") -> dict:
    image_url = "data:image/png;base64," + base64.b64encode(request.image_png).decode()
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    # the newline LLaVA's prompt has between <image> and the question
                    {"type": "text", "text": "\n" + request.question},
                ],
            },
        ],
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "timings_per_token": True,
        # every system prefills every prompt in full: no reuse of a previous request's KV
        "cache_prompt": False,
    }


def read_chunk(result: StreamResult, chunk: dict, now: float) -> None:
    """Fold one SSE `data:` object into the result (the counterpart of bench_client._read_frame)."""
    if "error" in chunk:
        result.error = str(chunk["error"])[:300]
        return
    usage = chunk.get("usage")
    if usage:
        result.completion_tokens = int(usage.get("completion_tokens", 0))
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            result.frame_times.append(now)
            done = (chunk.get("timings") or {}).get("predicted_n")
            # without per-token timings: one token per chunk
            result.frame_tokens.append(int(done) if done else len(result.frame_times))
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict, progress: Progress = _no_progress
) -> StreamResult:
    result = StreamResult(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return _finish(result)
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                seen = result.frame_tokens[-1] if result.frame_tokens else 0
                read_chunk(result, json.loads(line[len("data:") :]), time.perf_counter())
                progress((result.frame_tokens[-1] if result.frame_tokens else 0) - seen)
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return _finish(result)


def _finish(result: StreamResult) -> StreamResult:
    result.end = time.perf_counter()
    if result.error is None and result.finish_reason is None:
        result.error = "the stream ended without a finish_reason"
    if result.error is None and not result.completion_tokens and result.frame_tokens:
        result.completion_tokens = result.frame_tokens[-1]  # a server that sends no usage
    return result


async def drive_chat(
    url: str,
    requests: Sequence[BenchRequest],
    max_new_tokens: int,
    pid: int,
    timeout: float,
    progress: Progress = _no_progress,
) -> tuple[list[StreamResult], float, Sampler]:
    """All requests at once, as bench_client.drive does for the worker, over /v1/chat/completions."""
    return await drive(url, requests, max_new_tokens, pid, timeout, progress, body=chat_body, stream=stream_chat)
