"""8-bit and 4-bit models run in the batching engine and match their own model.generate."""

from __future__ import annotations

import pytest

from llava_serve.engine.engine import BatchEngine
from llava_serve.models.loader import LoadOptions, load_model
from tests.engine.helpers import Collector, greedy, make_cases, reference

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("mode", ["load_8bit", "load_4bit"])
def test_quantized_engine_matches_generate(mode, tiny_llava):
    lm = load_model(LoadOptions(model_path=str(tiny_llava), device="cpu", **{mode: True}))
    cases = make_cases(lm, 4)
    refs = [reference(lm, case, 8) for case in cases]
    engine = BatchEngine(lm, max_running=4, max_waiting=4).start()
    try:
        collectors = [Collector(lm, case, greedy(8)) for case in cases]
        for col in collectors:
            engine.submit(col.request)
        for col, ref in zip(collectors, refs):
            col.wait()
            assert col.request.output_ids == ref
    finally:
        engine.shutdown()
