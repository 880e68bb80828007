"""Real service processes for end-to-end tests: free ports, readiness wait, stop/kill by pid.

    with start_service(["llava_serve.controller", "--port", str(port)], port) as ctrl:
        httpx.get(ctrl.url + "/health")

`argv` is what follows `python -m`. The child runs with the repository on PYTHONPATH, its
stdout+stderr go to a temp log file (read it with `proc.log()`; it is printed when start-up
fails), and it is only ever signalled through its own pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A started service; a context manager that stops it on exit."""

    def __init__(self, popen: subprocess.Popen[bytes], port: int, log_file: IO[bytes], argv: list[str]):
        self.popen = popen
        self.port = port
        self.argv = argv
        self.url = f"http://127.0.0.1:{port}"
        self._log_file = log_file
        self._final_log: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return Path(self._log_file.name).read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to this process (by pid), if it still runs."""
        if self.alive():
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; closes and removes the log file (`log()` still
        answers). Returns the exit code."""
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(timeout)
        if self._final_log is None:  # kept in memory for log(); the file goes (it was left in /tmp)
            self._log_file.close()
            self._final_log = Path(self._log_file.name).read_text(errors="replace")
            Path(self._log_file.name).unlink(missing_ok=True)
        return self.popen.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(argv: list[str], port: int, env: dict[str, str] | None = None) -> Proc:
    """Start `python -m <argv>` without waiting for it to be ready."""
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    # Closed by Proc.stop(): the log outlives this function.
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115
        prefix=f"{argv[0]}-{port}-", suffix=".log", delete=False
    )
    popen = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=REPO_ROOT,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return Proc(popen, port, log_file, argv)


def wait_ready(proc: Proc, ready_path: str = "/health", timeout: float = 60.0) -> None:
    """Poll GET `ready_path` until it answers 200; raise with the log if the process dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.argv} exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            if httpx.get(proc.url + ready_path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{proc.argv} not ready on {proc.url}{ready_path} after {timeout}s:\n{proc.log()}")


def start_service(
    argv: list[str],
    port: int,
    ready_path: str = "/health",
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start `python -m <argv>` and return once `ready_path` answers 200 (stopping it on failure)."""
    proc = spawn(argv, port, env)
    try:
        wait_ready(proc, ready_path, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


class ProcGroup:
    """Several services stopped together (in reverse start order); handy in fixtures."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, argv: list[str], port: int, **kwargs: object) -> Proc:
        proc = start_service(argv, port, **kwargs)  # type: ignore[arg-type]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
