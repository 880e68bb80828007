"""Accuracy of a model on fresh shape pictures, per question kind, asked through a served worker.

    llava-serve eval [--split both|in-dist|heldout] [--n 200] [--seed S]
                     [--model-path P | --worker-address URL] [--concurrency 8]

Two splits. ``in-dist``: pictures from training's own generator (data.py), drawn with a seed
training never uses (default 20000). ``heldout``: pictures from a separate renderer that training
never sees (heldout.py: other palettes, shape outlines, backgrounds, sizes, anti-aliasing, JPEG,
crowding; default seed 70000). Each of ``--n`` pictures gets one question of each kind: colour,
shape, count, position and describe; each split also asks a dozen questions with no picture
("no image": the answer must point to sending a picture), and every run checks the fixed cases of
issue 15 (heldout.regression_cases). The questions go through a model worker's chat route,
``--concurrency`` at a time:
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
from llava_serve.default_model.heldout import (
    HELDOUT_GREETINGS,
    HELDOUT_SEED,
    regression_cases,
    render_heldout,
    sample_heldout_scene,
)
from llava_serve.default_model.questions import GENERATORS, KINDS, QA, TEXT_ONLY_QUESTIONS
from llava_serve.default_model.scoring import is_correct, stated_colours

EVAL_SEED = 20_000  # training uses small seeds (default 0)
SPLITS = ("in-dist", "heldout")
SEEDS = {"in-dist": EVAL_SEED, "heldout": HELDOUT_SEED}
MAX_NEW_TOKENS = 48  # a six-shape description is ~30 tokens
ROWS = (*KINDS, "no image")

Answerer = Callable[[Image.Image | None, str], str]


@dataclass(frozen=True)
class Item:
    image: Image.Image | None
    qa: QA


def eval_items(n: int, seed: int, split: str = "in-dist") -> Iterator[Item]:
    """``n`` fresh images, one question of each kind on each (re-drawn until the kind fits the scene),
    then the split's text-only questions."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    rng = random.Random(seed)
    for _ in range(n):
        if split == "heldout":
            scene = sample_heldout_scene(rng)
            image = render_heldout(scene, rng)
        else:
            scene = sample_scene(rng)
            image = render(scene, rng)
        for kind in KINDS:
            qa = next((q for q in (GENERATORS[kind](scene, rng) for _ in range(50)) if q.kind == kind), None)
            if qa is not None:
                yield Item(image, qa)
    greetings = HELDOUT_GREETINGS if split == "heldout" else rng.sample(TEXT_ONLY_QUESTIONS, 12)
    for question in greetings:
        yield Item(None, QA("no image", question, "", None))


def points_to_pictures(answer: str) -> bool:
    """A text-only answer that asks for a picture and makes up no picture's colours."""
    return "picture" in answer.lower() and not stated_colours(answer)


def score(kind: str, answer: str, target) -> bool:
    if kind in ("no image", "text"):
        return points_to_pictures(answer)
    return is_correct(kind, answer, target)


class LocalAnswerer:
    """model.generate in this process (float32, CPU unless told otherwise)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.device = device

    def __call__(self, image: Image.Image | None, question: str) -> str:
        from llava_serve.default_model.batches import conversation  # torch: loaded for a run, not for --help

        messages = conversation([QA("", question, "", None)], with_answers=False, with_image=image is not None)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [image] if image is not None else None
        inputs = self.processor(text=prompt, images=images, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


class WorkerAnswerer:
    """The served path: one chat generation on a model worker (it renders its own template)."""

    def __init__(self, address: str, timeout: float = 120.0) -> None:
        self.address = address
        self.timeout = timeout

    def __call__(self, image: Image.Image | None, question: str) -> str:
        from llava_serve.cluster.client import chat_sync
        from llava_serve.default_model.batches import conversation  # torch: loaded for a run, not for --help
        from llava_serve.protocol.worker import ChatRequest, ChatTurn

        messages = conversation([QA("", question, "", None)], with_answers=False, with_image=image is not None)
        request = ChatRequest(
            messages=[ChatTurn.model_validate(m) for m in messages],
            images=[png_base64(image)] if image is not None else [],
            temperature=0,
            max_new_tokens=MAX_NEW_TOKENS,
        )
        return chat_sync(self.address, request, timeout=self.timeout).text.strip()


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def evaluate(
    answer: Answerer,
    n: int,
    seed: int | None = None,
    progress: bool = True,
    concurrency: int = 1,
    split: str = "in-dist",
) -> dict:
    """One split's accuracy per question kind, and the regression cases."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    seed = SEEDS[split] if seed is None else seed
    results: dict[str, list[int]] = {k: [0, 0] for k in ROWS}
    failures: list[dict] = []
    start = time.monotonic()
    items = list(eval_items(n, seed, split))
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        replies = pool.map(lambda item: answer(item.image, item.qa.question), items)
        answered = tqdm(zip(items, replies), total=len(items), desc=split, disable=not progress, mininterval=2.0)
        for item, reply in answered:
            _score(item, reply, results, failures)
        cases = regression_cases()
        regression = [
            {"case": c.name, "question": c.question, "got": got, "ok": score(c.kind, got, c.target)}
            for c, got in zip(cases, pool.map(lambda c: answer(c.image, c.question), cases), strict=True)
        ]
    accuracy = {k: {"correct": c, "total": t, "accuracy": c / t if t else 0.0} for k, (c, t) in results.items()}
    return {
        "split": split,
        "n_images": n,
        "seed": seed,
        "accuracy": accuracy,
        "regression": regression,
        "seconds": time.monotonic() - start,
        "failures": failures,
    }


def _score(item: Item, reply: str, results: dict[str, list[int]], failures: list[dict]) -> None:
    ok = score(item.qa.kind, reply, item.qa.target)
    results[item.qa.kind][0] += ok
    results[item.qa.kind][1] += 1
    if not ok:
        failures.append({"kind": item.qa.kind, "question": item.qa.question, "expected": item.qa.answer, "got": reply})


def format_table(report: dict) -> str:
    lines = [f"split {report['split']}", f"{'kind':<10} {'correct':>8} {'total':>6} {'accuracy':>9}"]
    for kind, row in report["accuracy"].items():
        lines.append(f"{kind:<10} {row['correct']:>8} {row['total']:>6} {row['accuracy']:>8.1%}")
    lines.append(f"({report['n_images']} images, seed {report['seed']}, {report['seconds']:.0f} s)")
    return "\n".join(lines)


def format_regression(report: dict) -> str:
    lines = ["issue 15 cases:"]
    for r in report["regression"]:
        lines.append(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['case']}: {r['question']!r} -> {r['got']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="llava-serve eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", choices=(*SPLITS, "both"), default="both", help="which pictures (default both)")
    parser.add_argument("--n", type=int, default=200, help="number of fresh images per split (5 questions each)")
    parser.add_argument(
        "--seed", type=int, default=None, help=f"default {EVAL_SEED} (in-dist), {HELDOUT_SEED} (heldout)"
    )
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
    splits = SPLITS if args.split == "both" else (args.split,)

    def run(answer: Answerer, concurrency: int) -> list[dict]:
        return [evaluate(answer, args.n, args.seed, not args.json, concurrency, split) for split in splits]

    if args.in_process:
        import torch

        torch.set_num_threads(args.threads)
        reports = run(LocalAnswerer(path), 1)
    elif args.worker_address:
        reports = run(WorkerAnswerer(args.worker_address), args.concurrency)
    else:
        with started_worker(path, args.device, args.concurrency) as address:
            reports = run(WorkerAnswerer(address), args.concurrency)
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2, default=str))
        return
    for report in reports:
        print(format_table(report))
        for failure in report["failures"][: args.show_failures]:
            kind, question, got = failure["kind"], failure["question"], failure["got"]
            print(f"  [{kind}] {question!r} -> {got!r} (expected {failure['expected']!r})")
    print(format_regression(reports[-1]))


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
