"""Issue 13, attack 3: what COUNT copies of a WIDTHxHEIGHT RGBA PNG cost the worker's preprocessing
(decoding, the bundled model's processor), in-process, with the worker's default limits.

    python scripts/security/image_cost.py WIDTH HEIGHT [COUNT]
Before the fix, 1 16384: encoded in 20.9 s, peak RSS +3,329 MiB; after: 413 in 0.02 s."""

import base64
import resource
import struct
import sys
import time
import zlib

from llava_serve.models.loader import load_model
from llava_serve.protocol.worker import GenerateRequest
from llava_serve.worker.config import WorkerConfig
from llava_serve.worker.server import resolve_model_path
from llava_serve.worker.service import WorkerService


def png(width, height):
    row = b"\0" * (1 + width * 4)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


w, h = int(sys.argv[1]), int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 1
lm = load_model(WorkerConfig().load_options(resolve_model_path(None)))
svc = WorkerService.__new__(WorkerService)
svc.lm = lm
svc.limits = WorkerConfig().image_limits
data = base64.b64encode(png(w, h)).decode()
body = GenerateRequest(prompt="USER: " + "<image>" * n + " hi ASSISTANT:", images=[data] * n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
try:
    enc = svc.encode(body)
    outcome = f"encoded {len(enc.input_ids)} tokens"
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"
took = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{w}x{h} x{n} ({len(data)} b64 chars): {outcome} in {took:.2f}s, peak RSS +{after - before:.0f} MiB")
