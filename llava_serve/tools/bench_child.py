"""A subprocess of the benchmark (a worker, the static batch, a peer), logged to a file, stopped by its pid."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# the prefix of a line child's answers on stdout (LineChild): one per kind of child
STATIC_MARK = "BENCH-STATIC "
OPENVINO_MARK = "BENCH-OPENVINO "


class Child:
    """`argv` is a module run with this interpreter (`-m`), unless `program` gives the command itself."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        program: list[str] | None = None,
        **popen,
    ) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        stderr = popen.pop("stderr", self._log)
        command = [*(program or [sys.executable, "-m"]), *argv]
        self.popen = subprocess.Popen(command, stderr=stderr, env=env, **popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log tail:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


class LineChild(Child):
    """A child that answers JSON commands on stdin with one `MARK {json}` line on stdout each."""

    def __init__(self, name: str, argv: list[str], log: Path, mark: str, **kwargs) -> None:
        super().__init__(name, argv, log, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kwargs)
        self.mark = mark
        self.loaded = False
        self.ready_info: dict = {}

    def answer(self) -> dict:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(self.mark):
                return json.loads(line[len(self.mark) :])
        self.check_alive()
        raise RuntimeError(f"{self.name} closed its output")

    def wait_loaded(self) -> None:
        if not self.loaded:
            self.ready_info = self.answer()
            self.loaded = True

    def ask(self, command: dict) -> dict:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(command) + "\n").encode())
        self.popen.stdin.flush()
        return self.answer()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
