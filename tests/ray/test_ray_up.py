"""`llava-serve ray up` on the bundled model: the README's OpenAI snippet and LLaVA's stream route
answer through it, and Ctrl-C leaves no process of the Ray it started (its children, found by pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.procs import REPO_ROOT, free_port
from tests.ray.conftest import require_ray
from tests.test_up import HAS_DEFAULT, readme_examples_work

require_ray()


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def name_of(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return "?"


def alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.skipif(not HAS_DEFAULT, reason="the default model's weights are not built")
def test_ray_up_serves_the_readme_examples_and_stops_without_leftovers() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "llava_serve", "ray", "up", "--port", str(port), "--num-cpus", "2", "--device", "cpu"]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[int, psutil.Process] = {}
    names: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "ray up exited"
            seen.update({p.pid: p for p in descendants(proc.pid)})
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "ray up was not ready after 180 s"
            time.sleep(0.5)
        seen.update({p.pid: p for p in descendants(proc.pid)})
        names = {pid: name_of(p) for pid, p in seen.items()}
        readme_examples_work(api_port=port, worker_port=port)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out.decode()[-3000:]
    assert {"raylet", "gcs_server"} <= set(names.values()), f"ray up's Ray processes were not seen: {names}"
    deadline = time.monotonic() + 20
    while alive(list(seen.values())) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(list(seen.values())), f"left running after Ctrl-C: {alive(list(seen.values()))}"
