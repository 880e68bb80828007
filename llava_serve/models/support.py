"""Which architectures each engine serves exactly as transformers runs them, and why the others are refused.

A checkpoint whose forward needs more than token embeddings plus 1-D positions and a causal mask (M-RoPE
positions, token-type attention, sliding-window caches) would answer, but wrongly, or crash the engine on a
long prompt (issue 17). Such checkpoints are refused at load, before any weight is read, with the reason.
The model-coverage suite (tests/models/coverage/) asserts each refusal and each exact match.
"""

from __future__ import annotations

from pathlib import Path

from llava_serve.errors import ModelLoadError

_GEMMA3 = (
    "its sliding-window layers keep only the window in the cache, which the batch cache cannot hold yet, "
    "and its images need token_type_ids (bidirectional attention inside each image), which the engine drops"
)
_PALIGEMMA = (
    "its prefix (image + prompt) attends bidirectionally through token_type_ids and its positions start at 1; "
    "the engine runs a causal mask from position 0"
)
_MROPE = "it positions image tokens with 3-D M-RoPE (and rope deltas when decoding); the engine gives 1-D positions"
_NO_EMBEDS = "transformers' .generate() does not take inputs_embeds for this class"

# model_type -> engine -> why it is refused; a model_type not listed runs on both engines
REFUSED: dict[str, dict[str, str]] = {
    "gemma3": {"batch": _GEMMA3, "generate": f"{_NO_EMBEDS}, and {_GEMMA3}"},
    "paligemma": {"batch": _PALIGEMMA, "generate": f"{_NO_EMBEDS}, and {_PALIGEMMA}"},
    "qwen2_vl": {"batch": _MROPE, "generate": _MROPE},
    "qwen2_5_vl": {"batch": _MROPE, "generate": _MROPE},
}


def refusal(model_type: str, engine: str) -> str | None:
    """Why `engine` cannot serve `model_type` exactly, or None when it can."""
    return REFUSED.get(model_type, {}).get(engine)


def check_engine_support(config: dict, engine: str, path: str | Path = "") -> None:
    """Raise ModelLoadError when `engine` cannot serve this checkpoint (its config.json as a dict) exactly."""
    model_type = str(config.get("model_type", ""))
    reason = refusal(model_type, engine)
    if reason:
        served = [e for e in ("batch", "generate") if refusal(model_type, e) is None]
        hint = f"; use --engine {served[0]}" if served else ""
        raise ModelLoadError(
            f"{path or 'this checkpoint'}: model type {model_type!r} is not supported by the {engine} engine: "
            f"{reason}{hint}"
        )
