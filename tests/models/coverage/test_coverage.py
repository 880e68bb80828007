"""Model coverage: each architecture served exactly as transformers runs it, or refused at load (issue 17).

For every served architecture and chat shape (one image, two images, no image, three turns): the prompt the
project builds tokenizes to what `processor.apply_chat_template(..., tokenize=True)` gives, prefill logits
are within 1e-4 of transformers' forward, and 32 greedy tokens equal `model.generate`'s, through each
engine alone, and through the batch engine with 4 concurrent requests of different image shapes. Refused
architectures must fail at load with their reason. `scripts/models_matrix.py` turns the results into the
matrix in docs/models.md.
"""

from __future__ import annotations

import pytest
import torch

from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.generate_engine import GenerateEngine
from llava_serve.errors import ModelLoadError
from llava_serve.models.options import read_config
from llava_serve.models.support import check_engine_support, refusal
from llava_serve.worker.config import WorkerConfig
from llava_serve.worker.loading import load_model_and_engine
from tests.engine.helpers import Case, Collector, greedy
from tests.models.coverage.reference import (
    NEW_TOKENS,
    SHAPES,
    Chat,
    chat,
    generate,
    picture,
    prefill_logits,
    processor_inputs,
    serving_prefill_logits,
    user,
)

SERVED = ["llava", "llava_next", "llava_onevision", "internvl", "idefics3"]
REFUSED = ["gemma3", "paligemma", "qwen2_vl", "qwen2_5_vl"]
NEED_TORCHVISION = ["mistral3", "pixtral"]
FEATURES = ["one-image", "multi-image", "no-image", "multi-turn"]
ENGINES = {"batch": BatchEngine, "generate": GenerateEngine}


def run_engine(lm, engine_name: str, cases: list[Case]) -> list[list[int]]:
    engine = ENGINES[engine_name](lm, max_running=4, max_waiting=16).start()
    try:
        collectors = [Collector(lm, case, greedy(NEW_TOKENS)) for case in cases]
        for col in collectors:
            engine.submit(col.request)
        for col in collectors:
            out = col.wait()
            assert out.finish_reason == "length", out
        return [col.request.output_ids for col in collectors]
    finally:
        engine.shutdown()


def served_case(lm, c: Chat) -> Case:
    return Case(lm.build_prompt(c.messages), c.images)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("arch", SERVED)
def test_prompt_tokens(served, arch, feature):
    lm, c = served(arch), chat(feature)
    case = served_case(lm, c)
    assert lm.encode(case.prompt, case.images).input_ids == processor_inputs(lm, c)["input_ids"][0].tolist()


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("arch", SERVED)
def test_prefill_logits(served, arch, feature):
    lm, c = served(arch), chat(feature)
    case = served_case(lm, c)
    ours = serving_prefill_logits(lm, case.prompt, case.images)
    theirs = prefill_logits(lm, processor_inputs(lm, c))
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())


# the generate engine's runs are the slow half of the suite: `-m "not slow"` leaves them out
@pytest.mark.parametrize("engine", ["batch", pytest.param("generate", marks=pytest.mark.slow)])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("arch", SERVED)
def test_alone(served, arch, feature, engine):
    lm, c = served(arch), chat(feature)
    assert run_engine(lm, engine, [served_case(lm, c)]) == [generate(lm, processor_inputs(lm, c))]


@pytest.mark.parametrize("arch", SERVED)
def test_concurrent_shapes(served, arch):
    """Four requests of different image shapes decoded together by the batch engine."""
    lm = served(arch)
    chats = [Chat([user(f"Picture {i}: what is it?", 1)], [picture(size, i)]) for i, size in enumerate(SHAPES)]
    expected = [generate(lm, processor_inputs(lm, c)) for c in chats]
    assert run_engine(lm, "batch", [served_case(lm, c) for c in chats]) == expected


@pytest.mark.parametrize("engine", ["batch", "generate"])
@pytest.mark.parametrize("arch", REFUSED)
def test_refused_at_load(checkpoint, arch, engine):
    path = checkpoint(arch)
    reason = refusal(read_config(path)["model_type"], engine)
    assert reason
    with pytest.raises(ModelLoadError, match=f"model type '{arch}' is not supported by the {engine} engine"):
        load_model_and_engine(WorkerConfig(model_path=str(path), device="cpu", engine=engine))


@pytest.mark.parametrize("arch", NEED_TORCHVISION)
def test_refused_without_torchvision(checkpoint, arch):
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed: this architecture is not covered by the suite yet")
    with pytest.raises(ModelLoadError, match=r"needs torchvision.*llava-serve\[vision\]"):
        load_model_and_engine(WorkerConfig(model_path=str(checkpoint(arch)), device="cpu"))


@pytest.mark.parametrize("arch", SERVED)
def test_served_architectures_pass_the_engine_check(checkpoint, arch):
    for engine in ENGINES:
        check_engine_support(read_config(checkpoint(arch)), engine)
