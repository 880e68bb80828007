"""Accuracy of a model on fresh synthetic images, per question kind, asked through a served worker.

    llava-serve eval [--n 200] [--seed S] [--model-path P | --worker-address URL] [--concurrency 8]

Each of ``--n`` fresh images (drawn with ``--seed``, which training never uses) gets one question
of each kind: colour, shape, count, position and describe. The questions go through a model
worker's ``/worker_build_prompt`` and ``/worker_generate`` routes, ``--concurrency`` at a time:
a worker this command starts on ``--model-path`` (a real process on a free port, default: the
shipped checkpoint), or a running one at ``--worker-address``. ``--in-process`` asks
``model.generate`` directly instead (no server; for debugging a checkpoint).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from llava_serve.default_model import default_model_path
from llava_serve.default_model.data import render, sample_scene
from llava_serve.default_model.questions import GENERATORS, KINDS, QA
from llava_serve.default_model.scoring import is_correct

EVAL_SEED = 20_000  # training uses small seeds (default 0)
MAX_NEW_TOKENS = 32

Answerer = Callable[[Image.Image, str], str]


@dataclass(frozen=True)
class Item:
    image: Image.Image
    qa: QA


def eval_items(n: int, seed: int) -> Iterator[Item]:
    """``n`` fresh images, one question of each kind on each (re-drawn until the kind fits the scene)."""
    rng = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        image = render(scene, rng)
        for kind in KINDS:
            qa = next((q for q in (GENERATORS[kind](scene, rng) for _ in range(50)) if q.kind == kind), None)
            if qa is not None:
                yield Item(image, qa)


class LocalAnswerer:
    """model.generate in this process (float32, CPU unless told otherwise)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.device = device

    def __call__(self, image: Image.Image, question: str) -> str:
        from llava_serve.default_model.batches import conversation  # torch: loaded for a run, not for --help

        messages = conversation([QA("", question, "", None)], with_answers=False)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=[image], return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


class WorkerAnswerer:
    """The served path: one chat generation on a model worker (it renders its own template)."""

    def __init__(self, address: str, timeout: float = 120.0) -> None:
        self.address = address
        self.timeout = timeout

    def __call__(self, image: Image.Image, question: str) -> str:
        from llava_serve.cluster.client import chat_sync
        from llava_serve.default_model.batches import conversation  # torch: loaded for a run, not for --help
        from llava_serve.protocol.worker import ChatRequest, ChatTurn

        messages = conversation([QA("", question, "", None)], with_answers=False)
        request = ChatRequest(
            messages=[ChatTurn.model_validate(m) for m in messages],
            images=[png_base64(image)],
            temperature=0,
            max_new_tokens=MAX_NEW_TOKENS,
        )
        return chat_sync(self.address, request, timeout=self.timeout).text.strip()


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def evaluate(answer: Answerer, n: int, seed: int, progress: bool = True, concurrency: int = 1) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    results: dict[str, list[int]] = {k: [0, 0] for k in KINDS}
    failures: list[dict] = []
    start = time.monotonic()
    items = list(eval_items(n, seed))
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        replies = pool.map(lambda item: answer(item.image, item.qa.question), items)
        answered = tqdm(zip(items, replies), total=len(items), desc="eval", disable=not progress, mininterval=2.0)
        for item, reply in answered:
            _score(item, reply, results, failures)
    accuracy = {k: {"correct": c, "total": t, "accuracy": c / t if t else 0.0} for k, (c, t) in results.items()}
    return {
        "n_images": n,
        "seed": seed,
        "accuracy": accuracy,
        "seconds": time.monotonic() - start,
        "failures": failures,
    }


def _score(item: Item, reply: str, results: dict[str, list[int]], failures: list[dict]) -> None:
    ok = is_correct(item.qa.kind, reply, item.qa.target)
    results[item.qa.kind][0] += ok
    results[item.qa.kind][1] += 1
    if not ok:
        failures.append({"kind": item.qa.kind, "question": item.qa.question, "expected": item.qa.answer, "got": reply})


def format_table(report: dict) -> str:
    lines = [f"{'kind':<10} {'correct':>8} {'total':>6} {'accuracy':>9}"]
    for kind, row in report["accuracy"].items():
        lines.append(f"{kind:<10} {row['correct']:>8} {row['total']:>6} {row['accuracy']:>8.1%}")
    lines.append(f"({report['n_images']} images, seed {report['seed']}, {report['seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="llava-serve eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="number of fresh images (5 questions each)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--model-path", type=Path, default=None, help="default: the shipped checkpoint")
    target.add_argument("--worker-address", default=None, help="a running worker, e.g. http://127.0.0.1:21002")
    parser.add_argument("--in-process", action="store_true", help="model.generate in this process, no worker")
    parser.add_argument("--concurrency", type=int, default=8, help="questions in flight at once")
    parser.add_argument("--device", default="cpu", help="device of the worker this command starts")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--show-failures", type=int, default=5, help="print this many wrong answers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads with --in-process")
    args = parser.parse_args(argv)
    path = args.model_path or default_model_path()
    if args.in_process:
        import torch

        torch.set_num_threads(args.threads)
        report = evaluate(LocalAnswerer(path), args.n, args.seed, progress=not args.json)
    elif args.worker_address:
        report = evaluate(WorkerAnswerer(args.worker_address), args.n, args.seed, not args.json, args.concurrency)
    else:
        with started_worker(path, args.device, args.concurrency) as address:
            report = evaluate(WorkerAnswerer(address), args.n, args.seed, not args.json, args.concurrency)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(format_table(report))
    for failure in report["failures"][: args.show_failures]:
        print(f"  [{failure['kind']}] {failure['question']!r} -> {failure['got']!r} (expected {failure['expected']!r})")


@contextmanager
def started_worker(path: Path, device: str, concurrency: int) -> Iterator[str]:
    """A model worker process on a free loopback port (not registered with any controller),
    started and awaited the way `llava-serve up` starts its services."""
    import socket
    import subprocess
    import tempfile

    from llava_serve.up import start, wait_ready

    if not (path / "config.json").is_file():
        raise SystemExit(f"llava-serve eval: no checkpoint at {path}; pass --model-path")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["llava_serve.model_worker", "--model-path", str(path), "--device", device, "--host", "127.0.0.1",
            "--port", str(port), "--no-register", "--limit-model-concurrency", str(concurrency)]  # fmt: skip
    with tempfile.TemporaryDirectory() as log_dir:
        worker = start("worker", argv, port, "/ready", "127.0.0.1", Path(log_dir))
        try:
            wait_ready(worker, timeout=300)
            yield worker.url
        except RuntimeError as exc:
            raise SystemExit(f"llava-serve eval: {exc}") from None
        finally:
            worker.proc.terminate()
            try:
                worker.proc.wait(30)
            except subprocess.TimeoutExpired:
                worker.proc.kill()


if __name__ == "__main__":
    main()
