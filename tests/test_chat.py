"""`llava-serve chat` driven through its stdin like a person at a terminal."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image


def test_chat_streams_answers_and_handles_commands(tiny_llava, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 20, 20)).save(image)
    script = f"hello\n/image {image}\nWhat colour?\n/reset\n/image {tmp_path / 'missing.png'}\n/quit\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_serve",
            "chat",
            "--model-path",
            str(tiny_llava),
            "--device",
            "cpu",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("ASSISTANT: ") == 2
    answers = [line.split("ASSISTANT: ", 1)[1] for line in out.splitlines() if "ASSISTANT: " in line]
    assert all(a.strip() for a in answers)
    assert "(new image; conversation cleared)" in out and "(conversation cleared)" in out
    assert "cannot use that image" in out and "missing.png" in out
