"""Greedy answers of the bundled model in bfloat16, int8 or int4 weights against float32, through real workers.

    python benchmarks/dtype_agreement.py [--n 200] [--seed 20000] [--split in-dist] [--model-path P]
        [--dtypes float32,bfloat16] [--concurrency 8]

Starts one worker per dtype (`--dtype`, or `--quantization` for int8 and int4; the same checkpoint, not
registered), asks every question of `llava-serve eval` (its images and questions, seed `--seed`,
split `--split`) of each worker, greedy, and prints for each dtype its accuracy per question kind
and for each non-reference dtype how many answers are the same text as the first dtype's (the
reference). A quality check of half-precision and int8 weights: the answers a user sees, not
logits.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from llava_serve.default_model import default_model_path
from llava_serve.default_model.eval import WorkerAnswerer, eval_items, score
from llava_serve.up import Service, start, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(path: Path, dtype: str, log_dir: Path, concurrency: int = 8) -> Service:
    port = free_port()
    weights = ["--quantization", dtype] if dtype in ("int8", "int4") else ["--dtype", dtype]
    argv = ["llava_serve.model_worker", "--model-path", str(path), *weights, "--host", "127.0.0.1",
            "--port", str(port), "--no-register", "--limit-model-concurrency", str(concurrency)]  # fmt: skip
    worker = start(f"worker-{dtype}", argv, port, "/ready", "127.0.0.1", log_dir)
    wait_ready(worker, timeout=300)
    return worker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=20000)
    p.add_argument("--split", default="in-dist", choices=["in-dist", "heldout"])
    p.add_argument("--model-path", type=Path, default=default_model_path())
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", action="store_true")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (1: every decode step has one row)")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    items = list(eval_items(args.n, args.seed, args.split))
    answers: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="llava-serve-dtype-") as tmp:
        for dtype in dtypes:
            worker = start_worker(args.model_path, dtype, Path(tmp), args.concurrency)
            try:
                ask = WorkerAnswerer(worker.url)
                with ThreadPoolExecutor(args.concurrency) as pool:
                    replies = pool.map(lambda item, ask=ask: ask(item.image, item.qa.question), items)
                    answers[dtype] = list(tqdm(replies, total=len(items), desc=dtype))
            finally:
                worker.proc.terminate()
                worker.proc.wait(30)
    report: dict[str, dict] = {}
    reference = answers[dtypes[0]]
    for dtype in dtypes:
        kinds: dict[str, list[int]] = {}
        for item, reply in zip(items, answers[dtype], strict=True):
            tally = kinds.setdefault(item.qa.kind, [0, 0])
            tally[0] += score(item.qa.kind, reply, item.qa.target)
            tally[1] += 1
        same = sum(a == b for a, b in zip(reference, answers[dtype], strict=True))
        report[dtype] = {
            "accuracy": {k: c / t if t else 0.0 for k, (c, t) in kinds.items()},
            "same_answer_as_" + dtypes[0]: same / len(items),
            "questions": len(items),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    for dtype, row in report.items():
        acc = "  ".join(f"{k} {v:.1%}" for k, v in row["accuracy"].items())
        same = row["same_answer_as_" + dtypes[0]]
        print(f"{dtype:<9} {acc}  | same answer as {dtypes[0]}: {same:.1%} of {row['questions']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
