"""Which runner serves a loaded model: the decoder fast path where it applies, else transformers.

Called where the engine is built, which the worker does in its loading thread: the fused (and,
on CPU float32, oneDNN-prepacked) weights are made once, at load. `LLAVA_SERVE_RUNNER` (or the
`runner` argument) forces one path for A/B runs: `decoder`, `transformers` or `auto`.
"""

from __future__ import annotations

import logging
import os

from llava_serve.engine.decoder_runner import DecoderRunner
from llava_serve.engine.decoder_weights import (
    QUANTIZATIONS,
    build_decoder_weights,
    quantization_unsupported_reason,
    unsupported_reason,
)
from llava_serve.engine.prepack import prepack_linears
from llava_serve.engine.runner import HFRunner, RunnerBase
from llava_serve.errors import ModelLoadError
from llava_serve.models.base import LoadedModel

log = logging.getLogger(__name__)

RUNNER_ENV = "LLAVA_SERVE_RUNNER"
RUNNER_KINDS = ("auto", "decoder", "transformers")


def build_runner(
    lm: LoadedModel,
    max_rows: int,
    feature_cache_size: int = 64,
    prepack: bool = True,
    prefix_cache_bytes: int = 256 << 20,
    kind: str = "auto",
    quantization: str | None = None,
) -> RunnerBase:
    kind = os.environ.get(RUNNER_ENV, "auto") if kind == "auto" else kind
    if kind not in RUNNER_KINDS:
        raise ModelLoadError(f"unknown runner {kind!r}; use one of {', '.join(RUNNER_KINDS)}")
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ModelLoadError(f"unknown --quantization {quantization!r}; use int8 or int4")
        problem = "it needs the decoder runner" if kind == "transformers" else quantization_unsupported_reason(lm.model)
        if problem is not None:
            raise ModelLoadError(f"--quantization {quantization} cannot be used for {lm.name}: {problem}")
        weights = build_decoder_weights(lm.model, quantization=quantization)
        return DecoderRunner(lm, weights, max_rows, feature_cache_size, prefix_cache_bytes)
    reason = unsupported_reason(lm.model)
    if kind == "decoder" and reason is not None:
        raise ModelLoadError(f"the decoder runner cannot run {lm.name}: {reason}")
    if kind != "transformers" and reason is None:
        weights = build_decoder_weights(lm.model, prepack_rows=max_rows if prepack else 0)
        return DecoderRunner(lm, weights, max_rows, feature_cache_size, prefix_cache_bytes)
    if reason is not None:
        log.info("%s runs on the transformers path: %s", lm.name, reason)
    if prepack and max_rows > 1:  # this path has no weights of its own: its linears are swapped
        prepack_linears(lm.model, rows_hint=max_rows)
    return HFRunner(lm, max_rows, feature_cache_size)
