"""Issue 13, attack 5: idle and slowloris connections, and clients that leave mid-body, against a
controller started from the repository at ROOT.

    python scripts/security/idle_connections.py ROOT [SECONDS]
Prints how many of 60 connections (40 idle, 20 slowloris) are still open after SECONDS (default 12;
the default --header-timeout is 10 s) and how many bytes of log 50 clients leaving mid-body cost."""

import os
import select
import socket
import subprocess
import sys
import tempfile
import time

import httpx

root, wait, port = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 12.0, 23999
log_path = os.path.join(tempfile.mkdtemp(), "controller.log")
env = {**os.environ, "PYTHONPATH": root}
with open(log_path, "wb") as log:
    cmd = [sys.executable, "-m", "llava_serve.controller", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
try:
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    for s in socks[40:]:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    time.sleep(wait)
    readable, _, _ = select.select(socks, [], [], 0)
    closed = sum(1 for s in readable if s.recv(100) == b"")
    print(f"{root}: open after {wait:g} s: {len(socks) - closed} of {len(socks)}")
    size = os.path.getsize(log_path)
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b'POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"mo')
        s.close()
    time.sleep(1)
    print("log bytes for 50 clients leaving mid-body:", os.path.getsize(log_path) - size)
finally:
    proc.terminate()
    proc.wait()
