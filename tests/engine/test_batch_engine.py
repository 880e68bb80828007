"""The continuous-batching engine against plain transformers, and its request lifecycle."""

from __future__ import annotations

import time

import pytest

from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.errors import Overloaded
from llava_serve.models.loader import LoadOptions, load_model
from tests.engine.helpers import Collector, greedy, make_cases, reference


@pytest.fixture(scope="module", params=["llava", "llava-next", "text"])
def lm(request, checkpoints):
    return load_model(LoadOptions(model_path=str(checkpoints[request.param]), device="cpu"))


@pytest.fixture
def engine(lm):
    eng = BatchEngine(lm, max_running=6, max_waiting=32).start()
    yield eng
    eng.shutdown()


def test_staggered_requests_match_generate_alone(lm, engine):
    cases = make_cases(lm, 16)
    tokens = [12 + (i % 5) * 3 for i in range(16)]  # different lengths: requests leave at different steps
    refs = [reference(lm, c, n) for c, n in zip(cases, tokens)]
    collectors = []
    for i, (case, n) in enumerate(zip(cases, tokens)):
        col = Collector(lm, case, greedy(n))
        engine.submit(col.request)
        collectors.append(col)
        time.sleep(0.01 * (i % 3))  # arrivals between decode steps
    for i, col in enumerate(collectors):
        final = col.wait()
        assert final.finish_reason == "length"
        assert col.request.output_ids == refs[i], f"request {i} differs from model.generate"
        assert final.text == lm.tokenizer.decode(refs[i], skip_special_tokens=True)
        texts = [o.text for o in col.seen]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "streamed text shrank"
    assert engine.queue_length() == 0


def test_cancel_stops_within_a_step_and_frees_the_slot(lm):
    eng = BatchEngine(lm, max_running=1, max_waiting=4).start()
    try:
        case = make_cases(lm, 1)[0]
        first = Collector(lm, case, greedy(500))
        eng.submit(first.request)
        second = Collector(lm, case, greedy(5))
        eng.submit(second.request)  # waits: the only slot is taken
        while first.next().completion_tokens < 3:
            pass
        produced = first.request.output_ids[:]
        eng.abort(first.request)
        final = first.wait()
        assert final.finish_reason == "abort"
        assert len(first.request.output_ids) <= len(produced) + 1
        assert second.wait().finish_reason == "length"  # the freed slot was reused
        assert eng.queue_length() == 0
    finally:
        eng.shutdown()


def test_stop_string_across_tokens_is_cut(lm, engine):
    case = make_cases(lm, 3)[2]
    ref_text = lm.tokenizer.decode(reference(lm, case, 20), skip_special_tokens=True)
    stop = ref_text[len(ref_text) // 2 : len(ref_text) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), "the reference text is too short for this test"
    col = Collector(lm, case, greedy(20, stop=(stop,)))
    engine.submit(col.request)
    final = col.wait()
    assert final.finish_reason == "stop"
    assert final.text == ref_text[: ref_text.find(stop)]
    assert all(stop not in o.text for o in col.seen)


def test_overload_is_refused_and_nothing_leaks(lm):
    eng = BatchEngine(lm, max_running=1, max_waiting=1).start()
    try:
        case = make_cases(lm, 1)[0]
        a, b, c = (Collector(lm, case, greedy(30)) for _ in range(3))
        eng.submit(a.request)
        eng.submit(b.request)
        with pytest.raises(Overloaded):
            eng.submit(c.request)
        assert a.wait().finish_reason == "length" and b.wait().finish_reason == "length"
        assert eng.queue_length() == 0
    finally:
        eng.shutdown()


def test_seeded_sampling_repeats_and_zero_tokens(lm, engine):
    case = make_cases(lm, 2)[1]
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_new_tokens=10, ignore_eos=True)
    runs = []
    for _ in range(2):
        col = Collector(lm, case, params)
        engine.submit(col.request)
        col.wait()
        runs.append(col.request.output_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 10
    zero = Collector(lm, case, greedy(0))
    engine.submit(zero.request)
    out = zero.wait()
    assert out.finish_reason == "length" and out.completion_tokens == 0 and out.text == ""


def test_a_failing_step_fails_its_batch_and_the_engine_serves_on(lm, monkeypatch):
    eng = BatchEngine(lm, max_running=2, max_waiting=4).start()
    try:
        cases = make_cases(lm, 3)
        real_run, calls = eng.runner.run, {"n": 0}

        def run_failing_once(batch):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("a model bug")
            return real_run(batch)

        monkeypatch.setattr(eng.runner, "run", run_failing_once)
        running = [Collector(lm, c, greedy(20)) for c in cases[:2]]
        waiting = Collector(lm, cases[2], greedy(5))
        for col in (*running, waiting):
            eng.submit(col.request)
        for col in running:
            final = col.wait()
            assert final.finish_reason == "error" and final.error is not None
            assert final.error.code == 50001 and "internal error" in final.error.message
        assert waiting.wait().finish_reason == "length"  # admitted after the failure, served normally
        assert eng.is_alive() and eng.queue_length() == 0
        monkeypatch.setattr(eng.runner, "run", lambda batch: (_ for _ in ()).throw(RuntimeError("broken for good")))
        for _ in range(3):  # three failed steps in a row: the engine gives up, and says so
            col = Collector(lm, cases[0], greedy(5))
            eng.submit(col.request)
            assert col.wait().finish_reason == "error"
        eng.thread.join(5)
        assert not eng.is_alive() and eng.dead is not None
    finally:
        eng.shutdown()


def test_bench_checkpoint_staggered_requests_match_generate_alone(tmp_path_factory):
    """The ~170M benchmark model (64 image tokens, 12 layers) with the worker's settings: prepacked
    weights for a batch of up to 32, so the rows decode through the packed kernels."""
    from llava_serve.tools.checkpoints.build import build

    path = build("llava", "bench", tmp_path_factory.mktemp("bench") / "bench")
    lm = load_model(LoadOptions(model_path=str(path), device="cpu"))
    cases = [c for c in make_cases(lm, 6) if c.images][:4]
    tokens = [24, 16, 28, 20]
    refs = [reference(lm, c, n) for c, n in zip(cases, tokens)]
    eng = BatchEngine(lm, max_running=32, max_waiting=8).start()
    try:
        collectors = []
        for i, (case, n) in enumerate(zip(cases, tokens)):
            collectors.append(Collector(lm, case, greedy(n)))
            eng.submit(collectors[-1].request)
            time.sleep(0.05 * i)  # later arrivals join a running batch
        for i, col in enumerate(collectors):
            assert col.wait().finish_reason == "length"
            assert col.request.output_ids == refs[i], f"request {i} differs from model.generate"
    finally:
        eng.shutdown()
