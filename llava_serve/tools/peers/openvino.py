"""OpenVINO GenAI as a peer: the bench checkpoint exported to IR, its continuous-batching pipeline
driven in a child process (openvino_runner.py) with the same requests as the workers.

Export: `optimum-cli export openvino --task image-text-to-text --weight-format fp32|int8|int4`
(optimum-intel; int4 as the workers' --quantization int4 rounds: symmetric, groups of 32, every
layer NNCF lets be 4-bit), once per variant, kept under `--peer-dir`. optimum-intel 2.2 pins
transformers < 5.6, so it usually lives in a venv of its own (`--export-python`); the pipeline
itself needs only openvino-genai (`pip install -e .[peers]`, or `--openvino-python`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
from pathlib import Path

from tqdm import tqdm

import llava_serve
from llava_serve.tools.bench_child import OPENVINO_MARK, LineChild
from llava_serve.tools.bench_client import LevelSummary, Sampler, StreamResult, summarize
from llava_serve.tools.peers import split_variant

# our name -> optimum-cli's weight options
VARIANTS = {
    "f32": ["--weight-format", "fp32"],
    "int8": ["--weight-format", "int8"],
    "int4": ["--weight-format", "int4", "--sym", "--group-size", "32", "--ratio", "1.0"],
}
REPO_ROOT = str(Path(llava_serve.__file__).resolve().parent.parent)


def has_module(python: str, module: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=120, check=False)
    except OSError:  # no such interpreter
        return False
    return probe.returncode == 0


def missing(args: argparse.Namespace) -> str | None:
    """Why the OpenVINO peer cannot run, or None."""
    if not has_module(args.openvino_python, "openvino_genai"):
        return (
            f"openvino-genai is not installed for {args.openvino_python}: `pip install -e .[peers]`, "
            "or point --openvino-python at a venv that has it"
        )
    variants = [split_variant(spec, 0)[0] for spec in args.openvino_variants]
    exported = all((ir_dir(args, v) / "openvino_language_model.xml").is_file() for v in variants)
    if not exported and not has_module(args.export_python, "optimum.intel"):
        return (
            f"optimum-intel is not installed for {args.export_python} (needed once, to export the IR): "
            "make a venv with `pip install optimum-intel nncf` and pass --export-python VENV/bin/python"
        )
    return None


def ir_dir(args: argparse.Namespace, variant: str) -> Path:
    return args.peer_dir / "openvino" / variant


def export(model: Path, out: Path, variant: str, python: str) -> None:
    """optimum-cli's export of the checkpoint (classic layout) to `out`, once."""
    from llava_serve.tools.peers.layout import classic_copy

    if (out / "openvino_language_model.xml").is_file():
        return
    source = classic_copy(model, out.parent.parent / "classic-checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    argv = [python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(source)]
    argv += ["--task", "image-text-to-text", *VARIANTS[variant], str(tmp)]
    log = out.with_name(f"export-{variant}.log")
    print(f"exporting the checkpoint to OpenVINO IR ({variant}, once; a few minutes): {log}", flush=True)
    with log.open("wb") as sink, tqdm(desc=f"OpenVINO export {variant}", unit=" lines", disable=None) as bar:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:  # the exporter's own output: one tick a line, so a stall shows
            sink.write(line)
            bar.update()
        if proc.wait() != 0:
            raise RuntimeError(f"OpenVINO export failed ({proc.returncode}); see {log}")
    write_preprocessor_config(tmp)
    tmp.rename(out)


def write_preprocessor_config(ir: Path) -> None:
    """transformers 5 saves the image processor inside processor_config.json; OpenVINO GenAI 2026.4
    reads only preprocessor_config.json and otherwise takes CLIP's 336 px defaults, which a tower of
    another size rejects at its first request (a shape mismatch in the embeddings' Add). Write the
    flat file the pipeline reads, from the nested one, unless the exporter wrote it."""
    target, nested = ir / "preprocessor_config.json", ir / "processor_config.json"
    if target.is_file() or not nested.is_file():
        return
    proc = json.loads(nested.read_text())
    flat = dict(proc.get("image_processor", {}))
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "processor_class"):
        if key in proc:
            flat.setdefault(key, proc[key])
    target.write_text(json.dumps(flat, indent=2) + "\n")


class OpenVinoRunner(LineChild):
    def __init__(self, spec: str, args: argparse.Namespace) -> None:
        self.engine = f"openvino-{spec}"
        self.variant, self.threads = split_variant(spec, args.peer_threads)
        argv = ["llava_serve.tools.peers.openvino_runner", "--model-dir", str(ir_dir(args, self.variant))]
        argv += ["--threads", str(self.threads), "--max-seqs", str(max(32, *args.levels))]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
        log = args.out / f"peer-{self.engine}.log"
        super().__init__(self.engine, argv, log, mark=OPENVINO_MARK, env=env, program=[args.openvino_python, "-m"])

    def wait_ready(self) -> None:
        self.wait_loaded()

    def describe(self) -> str:
        version = self.ready_info.get("version", "?")
        return (
            f"{self.engine}: OpenVINO GenAI {version} ContinuousBatchingPipeline in process (as OpenVINO Model "
            f"Server drives it), IR from optimum-cli {' '.join(VARIANTS[self.variant])}, "
            f"INFERENCE_PRECISION_HINT f32, KV cache f32, {self.threads} threads"
        )

    def warm_up(self) -> None:
        self.ask({"n": 2, "max_new_tokens": 8, "round": -1})

    def run_level(self, n: int, args: argparse.Namespace, repeat: int) -> LevelSummary:
        async def measured() -> tuple[dict, Sampler]:
            with Sampler(self.pid) as sampler:
                command = {"n": n, "max_new_tokens": args.max_new_tokens, "round": repeat}
                answer = await asyncio.to_thread(self.ask, command)
            return answer, sampler

        print(f"{self.engine:>8} x{n:<3} running ({n * args.max_new_tokens} tokens)...", flush=True)
        answer, sampler = asyncio.run(measured())
        results = [as_stream_result(s, args.max_new_tokens) for s in answer["streams"]]
        return summarize(self.engine, n, args.max_new_tokens, results, answer["wall_s"], sampler, repeat)


def as_stream_result(stream: dict, max_new_tokens: int) -> StreamResult:
    """The runner's record of one request (times from the round's start) as the clients' StreamResult."""
    result = StreamResult(start=0.0, end=stream["end"], completion_tokens=stream["completion_tokens"])
    result.frame_times = list(stream["frame_times"])
    result.frame_tokens = list(stream["frame_tokens"])
    result.finish_reason = stream["finish_reason"] or ("length" if stream["completion_tokens"] else None)
    if stream["completion_tokens"] != max_new_tokens:
        result.error = f"{stream['completion_tokens']} of {max_new_tokens} tokens (status {stream.get('status')})"
    return result


def start(args: argparse.Namespace, model: Path) -> list[OpenVinoRunner]:
    runners = []
    for spec in args.openvino_variants:
        variant, _ = split_variant(spec, args.peer_threads)
        if variant not in VARIANTS:
            raise SystemExit(f"--openvino-variants: {variant!r} is not one of {', '.join(VARIANTS)}")
        export(model, ir_dir(args, variant), variant, args.export_python)
        runners.append(OpenVinoRunner(spec, args))
    return runners
