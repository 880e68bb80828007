"""`llava-serve generate` refuses bad input with one line that says what to fix, and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llava_serve", "generate", "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (32, 32), (200, 0, 0)).save(root / "ok.png")
    Image.new("1", (20000, 20000)).save(root / "huge.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (lambda f: ["--image", str(f / "missing.png"), "--prompt", "hi"], "no such file"),
        (lambda f: ["--image", str(f / "ok.png"), "--raw-prompt", "no placeholder"], "one image per <image>"),
        (lambda f: ["--image", str(f / "corrupt.png"), "--prompt", "hi"], "not a decodable image"),
        (lambda f: ["--image", str(f / "huge.png"), "--prompt", "hi"], "downscale"),
        (lambda f: ["--raw-prompt", "word " * 3000], "context length"),
    ],
)
def test_bad_input_is_one_clear_line(case, expected, files, tiny_llava):
    result = run("--model-path", str(tiny_llava), *case(files))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("llava-serve generate: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-500:]


def test_missing_model_folder(tmp_path):
    result = run("--model-path", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode != 0 and "no such folder" in result.stderr


def test_json_output(files, tiny_llava):
    import json

    result = run(
        "--model-path",
        str(tiny_llava),
        "--image",
        str(files / "ok.png"),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
        "--json",
    )
    answer = json.loads(result.stdout)
    assert answer["usage"]["completion_tokens"] == 4 and isinstance(answer["text"], str)
