"""The model worker as a real uvicorn process on a free port, with real clients."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests
from PIL import Image

from tests.procs import free_port, start_service

PROMPT = "A chat. USER: <image>\nWhat colour is the circle? ASSISTANT:"


def png_b64(colour=(220, 30, 30), size=(48, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def worker_argv(model: Path, port: int, *extra: str) -> list[str]:
    return [
        "llava_serve.model_worker",
        "--model-path",
        str(model),
        "--device",
        "cpu",
        "--port",
        str(port),
        *extra,
    ]


@pytest.fixture(scope="module")
def worker(tiny_llava):
    port = free_port()
    argv = worker_argv(tiny_llava, port, "--no-register", "--limit-model-concurrency", "4", "--max-queue", "4")
    with start_service(argv, port, ready_path="/ready", timeout=120) as proc:
        yield proc


def llava_client(url: str, prompt: str, images: list[str], **params) -> str:
    """Exactly what LLaVA's gradio demo / test_message do."""
    pload = {
        "model": "x",
        "prompt": prompt,
        "images": images,
        "temperature": 0.0,
        "max_new_tokens": 16,
        **params,
    }
    response = requests.post(url + "/worker_generate_stream", json=pload, stream=True, timeout=60)
    output = ""
    for chunk in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
        if chunk:
            data = json.loads(chunk.decode())
            assert data["error_code"] == 0, data
            output = data["text"][len(prompt) :].strip()
    return output


def test_llava_client_gets_the_generate_cli_answer(worker, tiny_llava, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(base64.b64decode(png_b64()))
    served = llava_client(worker.url, PROMPT, [png_b64()])
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_serve",
            "generate",
            "--model-path",
            str(tiny_llava),
            "--device",
            "cpu",
            "--image",
            str(image),
            "--raw-prompt",
            PROMPT,
            "--max-new-tokens",
            "16",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert served and served == json.loads(cli.stdout)["text"].strip()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt": PROMPT, "images": []}, 400, 40004),
        ({"prompt": "no tag", "images": ["AAAA"]}, 400, 40004),
        ({"prompt": PROMPT, "images": ["%%%not base64%%%"]}, 400, 40002),
        ({"prompt": PROMPT, "images": [base64.b64encode(b"not an image at all").decode()]}, 400, 40002),
        ({"prompt": "word " * 5000}, 400, 40303),
        ({"prompt": "hi", "temperature": -1}, 400, 40001),
        ({"prompt": "hi", "top_p": 0}, 400, 40001),
        ({"images": []}, 400, 40001),
    ],
)
def test_bad_requests_get_specific_errors(worker, body, status, code):
    response = requests.post(worker.url + "/worker_generate_stream", json=body, timeout=30)
    assert response.status_code == status
    frame = json.loads(response.content.split(b"\0")[0])
    assert frame["error_code"] == code
    assert "error_code" in frame["text"] and len(frame["text"]) > 20


def test_huge_image_is_refused_and_worker_still_serves(worker):
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # tiny file, 400 megapixels
    t0 = time.monotonic()
    response = requests.post(
        worker.url + "/worker_generate_stream",
        json={"prompt": PROMPT, "images": [base64.b64encode(buf.getvalue()).decode()]},
        timeout=30,
    )
    assert response.status_code == 413 and response.json()["error_code"] == 40003
    assert time.monotonic() - t0 < 5
    assert llava_client(worker.url, PROMPT, [png_b64()])


def _proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return fields


async def _disconnecting_client(url: str, i: int, sem: asyncio.Semaphore) -> int:
    async with sem, httpx.AsyncClient(timeout=60) as client:
        body = {
            "prompt": PROMPT,
            "images": [png_b64((i % 256, 80, 160))],
            "max_new_tokens": 200,
            "ignore_eos": True,
        }
        async with client.stream("POST", url + "/worker_generate_stream", json=body) as response:
            if response.status_code != 200:
                return response.status_code
            async for _ in response.aiter_bytes():
                if i % 3:
                    break  # leave mid-stream
            return 200


def test_disconnects_free_every_slot(worker):
    llava_client(worker.url, PROMPT, [png_b64()])  # warm up
    before = _proc_status(worker.pid)

    async def run() -> list[int]:
        sem = asyncio.Semaphore(8)
        return await asyncio.gather(*(_disconnecting_client(worker.url, i, sem) for i in range(200)))

    statuses = asyncio.run(run())
    assert set(statuses) <= {200, 429} and statuses.count(200) > 100
    deadline = time.monotonic() + 20
    while requests.post(worker.url + "/worker_get_status", timeout=5).json()["queue_length"]:
        assert time.monotonic() < deadline, "queue_length did not return to 0"
        time.sleep(0.1)
    after = _proc_status(worker.pid)
    assert after["Threads"] <= before["Threads"] + 2
    assert after["fds"] <= before["fds"] + 4
    assert after["VmRSS"] < before["VmRSS"] * 1.25
    assert llava_client(worker.url, PROMPT, [png_b64()])


def test_overload_gets_429_with_retry_after(worker):
    body = {"prompt": PROMPT, "images": [png_b64()], "max_new_tokens": 60, "ignore_eos": True}
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(httpx.post(worker.url + "/worker_generate", json=body, timeout=120))

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) == {200, 429}, statuses
    limited = [r for r in results if r.status_code == 429]
    assert all(r.headers.get("Retry-After") and r.json()["error_code"] == 42903 for r in limited)


def test_status_details_and_metrics(worker):
    status = requests.post(worker.url + "/worker_get_status", timeout=5).json()
    assert status["model_names"] and status["queue_length"] == 0
    assert requests.post(worker.url + "/model_details", timeout=5).json()["context_length"] == 1024
    count = requests.post(worker.url + "/count_token", json={"prompt": "hello there"}, timeout=5).json()
    assert count["count"] > 1 and count["error_code"] == 0
    metrics = requests.get(worker.url + "/metrics", timeout=5).text
    assert "llava_worker_generated_tokens_total" in metrics and "llava_worker_time_to_first_token_seconds" in metrics


def _registered(controller_url: str) -> list[str]:
    try:
        return requests.post(controller_url + "/list_models", timeout=2).json()["models"]
    except requests.RequestException:
        return []


def test_worker_before_controller_registers_and_survives_restart(tiny_llava):
    cport, wport = free_port(), free_port()
    controller = [
        "llava_serve.controller",
        "--port",
        str(cport),
        "--heart-beat-expiration",
        "6",
        "--heart-beat-interval",
        "2",
    ]
    waddr = f"http://localhost:{wport}"
    wargv = worker_argv(
        tiny_llava,
        wport,
        "--controller-address",
        f"http://localhost:{cport}",
        "--worker-address",
        waddr,
        "--heart-beat-interval",
        "2",
    )
    with start_service(wargv, wport, ready_path="/ready", timeout=120) as _worker:
        with start_service(controller, cport) as ctrl:
            deadline = time.monotonic() + 10
            while not _registered(ctrl.url):
                assert time.monotonic() < deadline, "worker never registered"
                time.sleep(0.2)
            ctrl.kill(signal.SIGKILL)
        with start_service(controller, cport) as ctrl:
            t0 = time.monotonic()
            while not _registered(ctrl.url):
                assert time.monotonic() - t0 < 2 + 2, "not registered again within one heartbeat interval"
                time.sleep(0.1)


def test_sigterm_drains_streams_and_leaves_the_controller(tiny_llava):
    cport, wport = free_port(), free_port()
    with start_service(["llava_serve.controller", "--port", str(cport)], cport) as ctrl:
        wargv = worker_argv(
            tiny_llava,
            wport,
            "--controller-address",
            ctrl.url,
            "--shutdown-grace",
            "2",
            "--worker-address",
            f"http://localhost:{wport}",
        )
        with start_service(wargv, wport, ready_path="/ready", timeout=120) as worker:
            deadline = time.monotonic() + 10
            while not _registered(ctrl.url):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            finals: list[dict] = []

            def stream() -> None:
                body = {"prompt": PROMPT, "images": [png_b64()], "max_new_tokens": 100000, "ignore_eos": True}
                with requests.post(worker.url + "/worker_generate_stream", json=body, stream=True, timeout=60) as r:
                    frames = [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]
                finals.append(frames[-1])

            threads = [threading.Thread(target=stream) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            worker.kill(signal.SIGTERM)
            assert _registered(ctrl.url) == [] or time.sleep(1) or _registered(ctrl.url) == []
            for t in threads:
                t.join(30)
            assert worker.wait(30) == 0
            assert len(finals) == 2 and all(f.get("finish_reason") in ("abort", "length") for f in finals)


def _queue_length(url: str) -> int:
    return requests.post(url + "/worker_get_status", timeout=5).json()["queue_length"]


def _aborted(url: str) -> float:
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('llava_worker_requests_total{outcome="abort"}'):
            return float(line.split()[-1])
    return 0.0


def test_non_streaming_client_that_leaves_cancels_its_generation(worker):
    """The client hangs up while its (non-streaming) generation runs: the slot is freed as an abort.

    Raw socket, so the hang-up happens right when the worker reports the request running, however
    fast the machine is (a read timeout would race the generation on a fast one).
    """
    body = json.dumps({"prompt": PROMPT, "images": [png_b64()], "max_new_tokens": 100000, "ignore_eos": True})
    host, port = worker.url.removeprefix("http://").split(":")
    aborted = _aborted(worker.url)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"POST /worker_generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        deadline = time.monotonic() + 10
        while not _queue_length(worker.url):
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
    deadline = time.monotonic() + 5
    while _queue_length(worker.url):
        assert time.monotonic() < deadline, "the abandoned generation kept its slot"
        time.sleep(0.1)
    assert _aborted(worker.url) == aborted + 1


def test_every_frame_counts_its_tokens(worker):
    """Usage in every frame (as FastChat's workers send it): completion tokens only grow, a frame
    may add several (text held back mid-character), and the last one says how many in all."""
    body = {"prompt": PROMPT, "images": [png_b64()], "temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
    response = requests.post(worker.url + "/worker_generate_stream", json=body, stream=True, timeout=60)
    frames = [json.loads(c) for c in response.iter_lines(decode_unicode=False, delimiter=b"\0") if c]
    counts = [f["usage"]["completion_tokens"] for f in frames]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 24, counts
    assert all(f["usage"]["prompt_tokens"] == frames[-1]["usage"]["prompt_tokens"] > 0 for f in frames)
    assert frames[-1]["finish_reason"] == "length" and all("finish_reason" not in f for f in frames[:-1])
