"""The benchmark's outputs: a markdown table, ratios against the targets, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from llava_serve.tools.bench_client import LevelSummary

PEER_PREFIXES = ("openvino-", "llama.cpp-")  # the engine names of peers/ rows

# issue 3's targets, measured in the same run
TARGETS = {
    "batch/generate at 16 clients": (16, "generate", 4.0),
    "batch/static at 16 clients": (16, "static", 1.3),
    "batch/generate at 1 client": (1, "generate", 0.95),
}


def _f(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def results_table(rows: Sequence[LevelSummary]) -> str:
    lines = [
        "| clients | round | engine | tokens/s | TTFT p50 / p95 (s) | ITL p50 / p95 (ms) | TPOT (ms) | requests/s "
        "| peak RSS (MiB) | other load (cores) | errors |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {"batch": 0, "generate": 1, "static": 9}
    for r in sorted(rows, key=lambda r: (r.concurrency, r.repeat, order.get(r.engine, 5), r.engine)):
        lines.append(
            f"| {r.concurrency} | {r.repeat + 1} | {r.engine} | {_f(r.tokens_per_s)} "
            f"| {_f(r.ttft_p50_s, 2)} / {_f(r.ttft_p95_s, 2)} | {_f(r.itl_p50_ms, 0)} / {_f(r.itl_p95_ms, 0)} "
            f"| {_f(r.tpot_mean_ms, 0)} | {_f(r.requests_per_s, 2)} | {_f(r.peak_rss_mib, 0)} "
            f"| {_f(r.other_load_cores, 2)} | {r.errors} |"
        )
    return "\n".join(lines)


def throughput(rows: Sequence[LevelSummary]) -> dict[int, dict[str, float]]:
    """Median tokens/s over the rounds of each (level, engine); a round with errors counts as nan."""
    runs: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        value = r.tokens_per_s if r.errors == 0 else float("nan")
        runs.setdefault(r.concurrency, {}).setdefault(r.engine, []).append(value)
    return {
        level: {engine: statistics.median(values) for engine, values in engines.items()}
        for level, engines in runs.items()
    }


def is_peer(engine: str) -> bool:
    return engine.startswith(PEER_PREFIXES)


def ratios(rows: Sequence[LevelSummary]) -> list[dict]:
    """Per level: every engine's tokens/s and batch over each of the others (generate, static, peers)."""
    out = []
    for level, tps in sorted(throughput(rows).items()):
        batch = tps.get("batch", float("nan"))
        others = {"generate", "static", *(e for e in tps if e != "batch")}
        out.append(
            {
                "concurrency": level,
                **{f"{k}_tokens_per_s": v for k, v in sorted(tps.items())},
                **{f"batch_over_{e}": batch / tps[e] if tps.get(e) else float("nan") for e in sorted(others)},
            }
        )
    return out


def ratio_table(rows: Sequence[LevelSummary]) -> str:
    """llava-serve's engines, then every other engine of the run beside them (a peer, or a worker
    spec such as `batch:bfloat16`): its tokens/s and batch / it. Worker specs first, then peers."""
    engines = {r.engine for r in rows} - {"batch", "generate", "static"}
    peers = sorted(engines, key=lambda e: (is_peer(e), e))
    head = "| clients | batch tok/s | generate tok/s | static tok/s | batch / generate | batch / static |"
    head += "".join(f" {p} tok/s | batch / {p} |" for p in peers)
    lines = [head, "|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(peers)]
    nan = float("nan")
    for r in ratios(rows):
        line = (
            f"| {r['concurrency']} | {_f(r.get('batch_tokens_per_s', nan))} "
            f"| {_f(r.get('generate_tokens_per_s', nan))} | {_f(r.get('static_tokens_per_s', nan))} "
            f"| {_f(r['batch_over_generate'], 2)} | {_f(r['batch_over_static'], 2)} |"
        )
        line += "".join(
            f" {_f(r.get(f'{p}_tokens_per_s', nan))} | {_f(r.get(f'batch_over_{p}', nan), 2)} |" for p in peers
        )
        lines.append(line)
    return "\n".join(lines)


# the weights' precision of an engine name: llava-serve's worker specs and the peers' variants
PRECISIONS = {"": "f32", "float32": "f32", "f32": "f32", "int8": "int8", "q8_0": "int8", "int4": "int4", "q4_0": "int4"}


def precision(engine: str) -> str | None:
    """f32 / int8 / int4 for `batch[:DTYPE][@N]`, `openvino-VARIANT[@N]` and `llama.cpp-VARIANT[@N]`;
    None for other engines (generate, static, bfloat16)."""
    name = engine.partition("@")[0]
    if is_peer(name):
        return PRECISIONS.get(name.partition("-")[2])
    base, _, dtype = name.partition(":")
    return PRECISIONS.get(dtype) if base == "batch" else None


def like_for_like_table(rows: Sequence[LevelSummary]) -> str:
    """Each llava-serve batch worker against each peer whose weights have the same precision (f32,
    int8 = q8_0, int4 = q4_0): both medians and the ratio. Empty when the run has no such pair."""
    lines = []
    for level, tps in sorted(throughput(rows).items()):
        ours = sorted(e for e in tps if not is_peer(e) and precision(e))
        for mine in ours:
            for peer in sorted(e for e in tps if is_peer(e) and precision(e) == precision(mine)):
                ratio = tps[mine] / tps[peer] if tps[peer] else float("nan")
                lines.append(
                    f"| {level} | {precision(mine)} | {mine} | {_f(tps[mine])} | {peer} | {_f(tps[peer])} "
                    f"| {_f(ratio, 2)} |"
                )
    if not lines:
        return ""
    head = "| clients | weights | llava-serve | tok/s | peer | tok/s | llava-serve / peer |"
    return "\n".join([head, "|---:|---|---|---:|---|---:|---:|", *lines])


def target_lines(rows: Sequence[LevelSummary]) -> list[str]:
    tps = throughput(rows)
    lines = []
    for name, (level, other, goal) in TARGETS.items():
        got = tps.get(level, {})
        if "batch" not in got or other not in got:
            lines.append(f"- {name}: not measured in this run (target >= {goal})")
            continue
        ratio = got["batch"] / got[other] if got[other] else float("nan")
        verdict = "met" if ratio >= goal else "MISSED"
        lines.append(f"- {name}: {ratio:.2f} (target >= {goal}) {verdict}")
    return lines


def markdown(rows: Sequence[LevelSummary], meta: dict) -> str:
    like_for_like = like_for_like_table(rows)
    parts = [
        "# llava-serve bench",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Model: {meta['model']}; {meta['machine']}; {meta['date']}; commit {meta['commit']}.",
        "",
        f"Every worker ran with --limit-model-concurrency {meta['limit_model_concurrency']}; each client streams "
        f"one request of {meta['max_new_tokens']} new tokens (greedy, EOS ignored). Ratios use the median of "
        f"{meta.get('repeat', 1)} round(s) per engine and level.",
        "",
        *(["Peers, run back to back with the workers on the same requests:", ""] if meta.get("peers") else []),
        *[f"- {line}" for line in meta.get("peers", [])],
        *([""] if meta.get("peers") else []),
        ratio_table(rows),
        "",
        *([like_for_like, ""] if like_for_like else []),
        *target_lines(rows),
        "",
        results_table(rows),
        "",
    ]
    return "\n".join(parts)


def plot(rows: Sequence[LevelSummary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {
        "batch": ("o-", "continuous batching (BatchEngine)"),
        "generate": ("s--", "thread per request (the LLaVA way)"),
        "static": ("^:", "one static model.generate batch"),
    }
    for engine in sorted({r.engine for r in rows} - set(styles)):  # variants such as generate@1
        styles[engine] = (".-", engine)
    for engine, (style, label) in styles.items():
        points = sorted((level, tps[engine]) for level, tps in throughput(rows).items() if engine in tps)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xscale("log", base=2)
    levels = sorted({r.concurrency for r in rows})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_all(rows: Sequence[LevelSummary], meta: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "bench.png"}
    payload = {"meta": meta, "results": [r.as_dict() for r in rows], "ratios": ratios(rows)}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["markdown"].write_text(markdown(rows, meta))
    plot(rows, paths["plot"], meta.get("title", meta["model"]))
    return paths
