"""`llava-serve generate`: one generation through the project's own engine, printed."""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llava_serve.engine.params import SamplingParams
from llava_serve.errors import ModelLoadError, ServeError
from llava_serve.models.images import ImageLimits, decode_image_bytes
from llava_serve.worker.config import add_model_args

if TYPE_CHECKING:  # torch loads with the model, not for --help
    from llava_serve.engine.base import EngineBase
    from llava_serve.engine.request import RequestOutput
    from llava_serve.models.base import LoadedModel


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-serve generate", description=__doc__)
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="one user message, put through the model's chat template")
    text.add_argument("--raw-prompt", help="used verbatim; one <image> per --image")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object with text and usage")
    return p


def run_once(
    lm: LoadedModel, engine: EngineBase, prompt: str, images: list, keys: list[str], params: SamplingParams
) -> RequestOutput:
    from llava_serve.engine.request import Request

    engine.start()
    outputs: queue.Queue[RequestOutput] = queue.Queue()
    try:
        engine.submit(Request(prompt=lm.encode(prompt, images, keys), params=params, sink=outputs.put))
        while True:
            out = outputs.get()
            if out.finished:
                return out
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except (ServeError, ModelLoadError, OSError) as exc:
        print(f"llava-serve generate: error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from llava_serve.worker.loading import config_from_model_args, load_model_and_engine

    files = [Path(f) for f in args.image]
    for f in files:
        if not f.is_file():
            raise ServeError(f"--image {f}: no such file")
    limits = ImageLimits()
    decoded = [decode_image_bytes(f.read_bytes(), limits, i) for i, f in enumerate(files)]
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    lm, engine = load_model_and_engine(config_from_model_args(args, limit_model_concurrency=1, max_queue=0))
    if args.raw_prompt is not None:
        prompt = args.raw_prompt
    else:
        content = [{"type": "image"} for _ in decoded] + [{"type": "text", "text": args.prompt}]
        prompt = lm.build_prompt([{"role": "user", "content": content}])
    keys = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    out = run_once(lm, engine, prompt, [d.image for d in decoded], keys, params)
    if out.error is not None:
        raise out.error
    if args.json:
        usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        print(json.dumps({"text": out.text, "finish_reason": out.finish_reason, "usage": usage}))
    else:
        print(out.text.strip())
    return 0
