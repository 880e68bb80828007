"""Worker flags map to WorkerConfig and to the engine built from it."""

from __future__ import annotations

import pytest
import torch

from llava_serve.engine.prepack import PackedLinear
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.worker.config import worker_config
from llava_serve.worker.loading import build_engine


def test_bad_flags_exit_with_usage_and_the_reason(capsys) -> None:
    for argv, reason in [
        (["--threads", "-1"], "--threads"),
        (["--quantization", "int8", "--engine", "generate"], "batch engine"),
        (["--quantization", "int8", "--dtype", "bfloat16"], "float32"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            worker_config(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "usage: llava-serve worker" in err and reason in err


def prepacked(engine) -> bool:  # type: ignore[no-untyped-def]
    """Whether the engine's runner decodes batches with oneDNN-prepacked weights (its fused weights on the
    decoder runner, the model's swapped linears on the transformers path)."""
    forward = getattr(engine.runner, "forward", None)
    weights = getattr(forward, "w", None)
    if weights is not None:
        return weights.lm_head.packed is not None
    return any(isinstance(m, PackedLinear) for m in engine.lm.model.modules())


def test_threads_fix_the_count_and_prepack_is_on_by_default(checkpoints) -> None:
    before = torch.get_num_threads()
    try:
        lm = load_model(LoadOptions(model_path=str(checkpoints["llava"]), device="cpu"))
        engine = build_engine(worker_config(["--threads", "1", "--limit-model-concurrency", "4"]), lm)
        assert torch.get_num_threads() == 1 and not engine.tuner.enabled
        assert prepacked(engine) == torch.backends.mkldnn.is_available()
        lm2 = load_model(LoadOptions(model_path=str(checkpoints["llava"]), device="cpu"))
        assert not prepacked(build_engine(worker_config(["--no-prepack"]), lm2))
    finally:
        torch.set_num_threads(before)
