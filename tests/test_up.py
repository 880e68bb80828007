"""`llava-serve up` end to end: the whole stack in one command, asked through the official openai client,
and the README's examples run verbatim against it."""

from __future__ import annotations

import base64
import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image, ImageDraw

from llava_serve.default_model import default_model_path
from llava_serve.protocol.frames import Frame
from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HAS_DEFAULT = (default_model_path() / "config.json").is_file()


def red_circle_png() -> str:
    img = Image.new("RGB", (160, 120), (245, 245, 240))
    ImageDraw.Draw(img).ellipse((50, 30, 110, 90), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "up exited"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready")


@pytest.mark.skipif(not HAS_DEFAULT, reason="the default model's weights are not built")
def test_up_serves_the_default_model_and_stops_cleanly(tmp_path):
    ports = [free_port() for _ in range(4)]
    argv = [
        sys.executable,
        "-m",
        "llava_serve",
        "up",
        "--device",
        "cpu",
        "--no-web",
        "--controller-port",
        str(ports[0]),
        "--worker-port",
        str(ports[1]),
        "--api-port",
        str(ports[2]),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{ports[1]}/ready", proc)
        wait_for(f"http://127.0.0.1:{ports[2]}/health", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[2]}/v1", api_key="none")
        deadline = time.monotonic() + 30
        while not client.models.list().data:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        model = client.models.list().data[0].id
        content = [
            {"type": "image_url", "image_url": {"url": red_circle_png()}},
            {"type": "text", "text": "What colour is the circle?"},
        ]
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=20
        )
        assert "red" in answer.choices[0].message.content.lower()
        readme_examples_work(api_port=ports[2], worker_port=ports[1])
        # up's registration secret: a process that does not have it cannot register or unregister
        ctrl = f"http://127.0.0.1:{ports[0]}"
        for route in ("/register_worker", "/unregister_worker"):
            refused = httpx.post(ctrl + route, json={"worker_name": f"http://127.0.0.1:{ports[1]}"}, timeout=5)
            assert refused.status_code == 403, route
        assert httpx.post(ctrl + "/list_models", timeout=5).json()["models"] == [model]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert b"all services stopped" in out
    for port in ports[:3]:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def readme_examples_work(api_port: int, worker_port: int) -> None:
    """The README's examples, pasted verbatim into a shell in the repository (only the ports differ)."""
    (snippet,) = [b for b in readme_blocks("python") if "OpenAI(" in b]
    snippet = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{api_port}")
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "red" in ran.stdout.lower(), ran.stdout
    (curl,) = [b for b in readme_blocks("bash") if "curl " in b]
    curl = curl.replace("localhost:21002", f"localhost:{worker_port}")
    ran = subprocess.run(["bash", "-c", curl], cwd=ROOT, capture_output=True, text=True, timeout=120)
    frames = [Frame.model_validate_json(line) for line in ran.stdout.splitlines() if line.strip()]
    assert ran.returncode == 0 and frames, ran.stderr
    assert frames[-1].error_code == 0 and frames[-1].finish_reason is not None, frames[-1]
    assert "red" in frames[-1].text.lower(), frames[-1].text


def test_up_refuses_a_taken_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "llava_serve", "up", "--controller-port", str(taken)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"controller port {taken}" in result.stderr and "--controller-port" in result.stderr


@pytest.mark.skipif(HAS_DEFAULT, reason="the default model's weights are present")
def test_up_without_a_model_says_what_to_pass():
    result = subprocess.run([sys.executable, "-m", "llava_serve", "up"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--model-path" in result.stderr and "build-model" in result.stderr
