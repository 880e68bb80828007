"""Fixtures for the web demo's tests: the fake backend as a real process, and a red circle."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.procs import Proc, free_port, start_service

FAKE_API_KEY = "web-test-key"


@dataclass(frozen=True)
class Backend:
    """A controller the demo can talk to. `proc` is set when the test started it (the fake)."""

    url: str
    api_key: str | None = None
    model: str | None = None  # the model to chat with; None: whichever the demo picks first
    proc: Proc | None = None


@pytest.fixture(scope="session")
def fake_backend() -> Iterator[Backend]:
    port = free_port()
    argv = ["tests.web.fake_backend", "--port", str(port), "--word-delay", "0.15", "--api-key", FAKE_API_KEY]
    with start_service(argv, port) as proc:
        yield Backend(proc.url, FAKE_API_KEY, "fake-llava", proc)


def draw_circle(path: Path, colour: tuple[int, int, int], size: int = 320) -> Path:
    """A filled circle of `colour` on white, saved as PNG."""
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((size // 8, size // 8, size * 7 // 8, size * 7 // 8), fill=colour)
    img.save(path)
    return path


@pytest.fixture
def red_circle(tmp_path: Path) -> Path:
    return draw_circle(tmp_path / "red_circle.png", (220, 30, 30))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
