"""The web demo in a real browser: real processes on free ports, driven by Playwright + Chromium.

A picture of a red circle is uploaded, "What colour is the circle?" asked, and "red" must
stream into the page (the answer is seen growing); backend errors must read as text; Stop must
close the stream. The screenshot in docs/images/web_demo.png comes from here
(`UPDATE_SCREENSHOTS=1 pytest -m browser tests/web` rewrites it).

The chat test talks to `chat_backend`: a real controller and model worker serving the shipped
default model (so "red" is the model's own answer), or the controller at LLAVA_SERVE_WEB_BACKEND
(key: LLAVA_SERVE_WEB_BACKEND_KEY) if set. The error and stop tests use the fake backend, which can
fail on purpose and counts closed streams.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llava_serve.default_model import default_model_path
from tests.procs import Proc, ProcGroup, free_port, start_service
from tests.web.conftest import Backend

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "web_demo.png"
QUESTION = "What colour is the circle?"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


# In CI (CI=true, as .ci/run runs) a missing browser fails the run instead of skipping the test.
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true")
if REQUIRED and _missing() is not None:
    raise RuntimeError(f"CI needs the browser test and it cannot run: {_missing()}")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
    pytest.mark.timeout(120),
]

if _missing() is None:
    from playwright.sync_api import Browser, Page, expect, sync_playwright


@pytest.fixture(scope="module")
def chat_backend() -> Iterator[Backend]:
    """A real controller + model worker on the shipped default model (or LLAVA_SERVE_WEB_BACKEND)."""
    url = os.environ.get("LLAVA_SERVE_WEB_BACKEND")
    if url:
        yield Backend(url.rstrip("/"), os.environ.get("LLAVA_SERVE_WEB_BACKEND_KEY"))
        return
    if not (default_model_path() / "config.json").is_file():
        pytest.fail(f"the shipped default model is missing ({default_model_path()})")
    group = ProcGroup()
    try:
        ctrl_port, worker_port = free_port(), free_port()
        ctrl = group.start(["llava_serve.controller", "--port", str(ctrl_port)], ctrl_port)
        group.start(["llava_serve.model_worker", "--device", "cpu", "--port", str(worker_port),
                     "--controller-address", ctrl.url, "--heart-beat-interval", "1"],
                    worker_port, ready_path="/ready", timeout=120)  # fmt: skip
        deadline = time.monotonic() + 30
        while not httpx.post(ctrl.url + "/list_models", timeout=5).json()["models"]:
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.2)
        yield Backend(ctrl.url)
    finally:
        group.stop_all()


@pytest.fixture(scope="module")
def web_for() -> Iterator[Callable[[Backend], Proc]]:
    """One web demo process per backend, started on first use, stopped by pid at the end."""
    started: dict[str, Proc] = {}

    def web(backend: Backend) -> Proc:
        if backend.url not in started:
            port = free_port()
            argv = ["llava_serve.web", "--controller-url", backend.url, "--port", str(port)]
            if backend.api_key:
                argv += ["--controller-api-key", backend.api_key]
            started[backend.url] = start_service(argv, port, timeout=60)
        return started[backend.url]

    yield web
    for proc in started.values():
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_demo(browser: Browser, web_for: Callable[[Backend], Proc]) -> Iterator[Callable[[Backend], Page]]:
    """A fresh page (its own Gradio session) on the demo for a backend, models loaded."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})

    def open_page(backend: Backend) -> Page:
        page = context.new_page()
        page.goto(web_for(backend).url + "/")
        expect(page.locator("#model-selector input")).not_to_have_value("", timeout=20_000)
        if backend.model:
            choose_model(page, backend.model)
        _record_answer_texts(page)
        return page

    yield open_page
    context.close()


def choose_model(page: Page, model: str) -> None:
    page.locator("#model-selector input").click()
    page.get_by_role("option", name=model, exact=True).click()
    expect(page.locator("#model-selector input")).to_have_value(model)


def _record_answer_texts(page: Page) -> None:
    """Keep every distinct text the latest answer shows, however fast it changes. The whole page is
    observed and the chat looked up on each change: Gradio may render the chat element anew."""
    page.evaluate(
        """() => {
        window.answerTexts = [];
        new MutationObserver(() => {
            const root = document.querySelector('#chatbot');
            const bots = root ? root.querySelectorAll('[data-testid="bot"]') : [];
            const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
            const seen = window.answerTexts;
            if (text && seen[seen.length - 1] !== text) seen.push(text);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }"""
    )


def ask(page: Page, question: str, image: Path | None = None) -> None:
    if image is not None:
        page.locator("#image-input input[type=file]").set_input_files(str(image))
        expect(page.locator("#image-input img")).to_be_visible(timeout=10_000)
    page.locator("#msg-input textarea").fill(question)
    page.locator("#msg-input textarea").press("Enter")


def last_answer(page: Page) -> str:
    texts = page.locator('#chatbot [data-testid="bot"]').all_inner_texts()
    return texts[-1].strip() if texts else ""


def wait_settled(page: Page, pattern: str, timeout: float = 60.0, quiet: float = 1.0) -> str:
    """The last answer once it matches `pattern` and has not changed for `quiet` seconds."""
    expect(page.locator('#chatbot [data-testid="bot"]').last).to_contain_text(
        re.compile(pattern, re.IGNORECASE), timeout=timeout * 1000
    )
    text, since = last_answer(page), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.1)
        if (now := last_answer(page)) != text:
            text, since = now, time.monotonic()
    return text


def screenshot_path(tmp_path: Path) -> Path:
    """docs/images/web_demo.png with UPDATE_SCREENSHOTS=1; otherwise a temp file (the PNG's bytes
    differ from run to run, and a test run should not dirty the checkout)."""
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        return SCREENSHOT
    return tmp_path / SCREENSHOT.name


def fake_stats(backend: Backend) -> dict[str, int]:
    return httpx.get(backend.url + "/stats", timeout=5).json()


def test_red_circle_answer_streams_in(
    open_demo: Callable[[Backend], Page], chat_backend: Backend, red_circle: Path, tmp_path: Path
) -> None:
    page = open_demo(chat_backend)
    ask(page, QUESTION, red_circle)
    final = wait_settled(page, r"\bred\b")
    seen: list[str] = page.evaluate("window.answerTexts")
    partial = [t for t in seen if t != final]
    # at least one text before the final one: a page that only shows whole answers has none (on a
    # loaded machine the model's few tokens can reach the page in as few as two updates)
    assert len(partial) >= 1 and seen[-1] == final, f"the answer did not stream: texts seen {seen}"
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:])), seen
    assert all(final.startswith(t) for t in partial), seen  # each step extends the one before
    expect(page.locator('#chatbot [data-testid="user"]').last).to_contain_text(QUESTION)
    page.screenshot(path=str(screenshot_path(tmp_path)))


def test_backend_errors_read_as_text(
    open_demo: Callable[[Backend], Page], fake_backend: Backend, red_circle: Path
) -> None:
    page = open_demo(fake_backend)
    choose_model(page, "fake-broken")
    ask(page, QUESTION, red_circle)
    failed = wait_settled(page, r"error code 50002")
    assert failed.startswith("Looking at") and "Error: worker ran out of GPU memory while decoding" in failed
    choose_model(page, "fake-busy")
    ask(page, "And now?")
    busy = wait_settled(page, r"error code 42903")
    assert "the model is busy, try again in 3 s" in busy
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "NETWORK ERROR" not in body


def test_stop_closes_the_stream(open_demo: Callable[[Backend], Page], fake_backend: Backend, red_circle: Path) -> None:
    page = open_demo(fake_backend)
    before = fake_stats(fake_backend)
    ask(page, QUESTION, red_circle)
    expect(page.locator('#chatbot [data-testid="bot"]').last).to_contain_text("Looking", timeout=20_000)
    page.locator("#stop-btn").click()
    deadline = time.monotonic() + 5
    while fake_stats(fake_backend)["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = fake_stats(fake_backend)
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0, (before, after)
    stopped = wait_settled(page, r"Looking", quiet=1.0)
    assert not stopped.endswith("red.")  # it did stop half-way
    ask(page, "Try once more?")  # the chat is usable again after a stop
    assert wait_settled(page, r"\bred\.").endswith("is red.")
