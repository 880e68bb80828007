"""Memory footprint of one checkpoint in each load mode (float32, --load-8bit, --load-4bit).

    python -m llava_serve.tools.footprint --model-path P [--model-base B] [--modes float32,8bit,4bit]

Each mode runs in a fresh subprocess, so one mode's leftovers do not count against the next.
Columns: `model.get_memory_footprint()` (parameters and buffers as transformers counts them), the
process RSS just before loading, the RSS after loading and after one short generation (one image,
8 new tokens), the peak RSS of the whole run (ru_maxrss, which includes the load's transient
copies) and the load time. RSS figures are Linux-only (/proc/self/statm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = {"float32": {}, "8bit": {"load_8bit": True}, "4bit": {"load_4bit": True}}  # "float32": no quantization
MIB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(args: argparse.Namespace, mode: str) -> dict:
    import torch
    from PIL import Image

    from llava_serve.models.loader import LoadOptions, load_model

    options = LoadOptions(
        model_path=args.model_path,
        model_base=args.model_base,
        vision_tower=args.vision_tower,
        device=args.device,
        dtype=args.dtype,
        **MODES[mode],
    )
    before = rss_bytes()
    start = time.perf_counter()
    lm = load_model(options)
    load_s = time.perf_counter() - start
    after_load = rss_bytes()
    images = [Image.new("RGB", (64, 48), (200, 40, 40))] if lm.is_multimodal else []
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is in the picture?"}]
    encoded = lm.encode(lm.build_prompt([{"role": "user", "content": content}]), images)
    pixels = {k: torch.cat([u.inputs[k] for u in encoded.images]) for k in (encoded.images[0].inputs if images else {})}
    ids = torch.tensor([encoded.input_ids], device=lm.device)
    with torch.inference_mode():
        lm.model.generate(input_ids=ids, **pixels, max_new_tokens=8, do_sample=False)
    return {
        "mode": mode,
        "footprint": lm.model.get_memory_footprint(),
        "rss_before": before,
        "rss_loaded": after_load,
        "rss_generated": rss_bytes(),
        "peak_rss": peak_rss_bytes(),
        "load_s": load_s,
    }


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, "-m", "llava_serve.tools.footprint", "--one", mode, "--model-path", args.model_path]
    for flag, value in (("--model-base", args.model_base), ("--vision-tower", args.vision_tower)):
        if value:
            cmd += [flag, value]
    cmd += ["--device", args.device, "--dtype", args.dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    base = next((r["footprint"] for r in rows if r["mode"] == "float32"), None)
    lines = [
        "| mode | get_memory_footprint | vs float32 | RSS before load | RSS loaded | RSS after generate "
        "| peak RSS | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['footprint'] / base:.2f}x" if base else "-"
        mib = [f"{r[k] / MIB:.1f} MiB" for k in ("footprint", "rss_before", "rss_loaded", "rss_generated", "peak_rss")]
        lines.append(f"| {r['mode']} | {mib[0]} | {ratio} | {' | '.join(mib[1:])} | {r['load_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_serve.tools.footprint", description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base")
    parser.add_argument("--vision-tower")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="compute dtype; the baseline row is this dtype unquantized")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--one", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    rows = []
    for mode in modes:
        print(f"measuring {mode} ...", file=sys.stderr, flush=True)
        rows.append(run_mode(args, mode))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
