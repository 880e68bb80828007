"""EngineBase.run_on_engine_thread: work that needs the model runs on the thread that owns it."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.generate_engine import GenerateEngine
from llava_serve.errors import EngineDead
from llava_serve.models.loader import LoadOptions, load_model


@pytest.fixture(scope="module")
def lm(tiny_llava):  # type: ignore[no-untyped-def]
    return load_model(LoadOptions(model_path=str(tiny_llava), device="cpu"))


def test_calls_run_on_the_engine_thread_between_steps(lm) -> None:  # type: ignore[no-untyped-def]
    engine = BatchEngine(lm, max_running=2, max_waiting=4).start()
    try:
        assert engine.run_on_engine_thread(lambda: threading.current_thread()).result(10) is engine.thread

        def boom() -> None:
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            engine.run_on_engine_thread(boom).result(10)
        assert engine.run_on_engine_thread(lambda: 42).result(10) == 42  # a failed call leaves it serving
    finally:
        engine.shutdown()
    with pytest.raises(EngineDead):
        engine.run_on_engine_thread(lambda: 1).result(10)


def test_a_call_queued_as_the_engine_stops_is_failed_not_lost(lm) -> None:  # type: ignore[no-untyped-def]
    engine = BatchEngine(lm, max_running=2, max_waiting=4).start()
    gate = threading.Event()
    first: Future = engine.run_on_engine_thread(lambda: gate.wait(10))
    second: Future = engine.run_on_engine_thread(lambda: "late")
    stopper = threading.Thread(target=engine.shutdown)
    stopper.start()
    gate.set()
    stopper.join(15)
    assert first.result(10) is True
    assert second.done() and (second.exception() is None or isinstance(second.exception(), EngineDead))


def test_thread_per_request_engine_runs_calls_on_a_thread_of_their_own(lm) -> None:  # type: ignore[no-untyped-def]
    engine = GenerateEngine(lm, max_running=2, max_waiting=4).start()
    try:
        thread = engine.run_on_engine_thread(lambda: threading.current_thread()).result(10)
        assert thread is not threading.main_thread() and thread.name == "llava-serve-call"
    finally:
        engine.shutdown()
