"""tests/procs.py: starts a real process, waits for readiness, stops/kills it by pid."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.procs import free_port, spawn, start_service, wait_ready


def test_start_wait_kill() -> None:
    port = free_port()
    with start_service(["http.server", str(port), "--bind", "127.0.0.1"], port, ready_path="/") as proc:
        assert httpx.get(proc.url + "/").status_code == 200
        proc.kill(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert "GET / HTTP" in proc.log()


def test_dead_process_reported_with_log() -> None:
    port = free_port()
    proc = spawn(["llava_serve.no_such_module"], port)
    with pytest.raises(RuntimeError, match="No module named"):
        wait_ready(proc, timeout=10)
    proc.stop()
