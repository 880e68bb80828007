"""The engine caps oneDNN's per-shape kernel caches: many row counts through a packed weight no
longer grow the heap by ~0.5 MiB each (see llava_serve/engine/kernel_caches.py). Each case runs in a
fresh process, since both caches read their capacity when the process makes its first kernel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llava_serve.engine.kernel_caches import CAPACITY_VARS, bound_kernel_caches, kernel_cache_capacity
from tests.procs import REPO_ROOT

ROW_COUNTS = 250

PROBE = r"""
import ctypes, json, os, sys
import torch
from llava_serve.engine.kernel_caches import bound_kernel_caches

class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo

def in_use_mib():
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20

capped = sys.argv[1] == "capped"
for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.pop(name, None)
if capped:
    bound_kernel_caches(2)
torch.set_num_threads(1)
packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(256, 64), 16)
x = torch.randn(4, 64)
torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
before = in_use_mib()
for rows in range(5, 5 + int(sys.argv[2])):
    torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 64), packed, None, "none", [], "")
print(json.dumps({"grew_mib": in_use_mib() - before}))
"""


def _growth(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(ROW_COUNTS)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return float(json.loads(done.stdout.strip().splitlines()[-1])["grew_mib"])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (torch's CPU build)")
def test_capped_caches_stop_the_heap_growing_with_new_row_counts() -> None:
    uncapped, capped = _growth("uncapped"), _growth("capped")
    # uncapped: ~0.5 MiB per row count kept (250 row counts: ~130 MiB); capped at 84 entries per cache
    # the heap holds at most those (~35 MiB)
    assert uncapped > 80, uncapped
    assert capped < 0.5 * uncapped, (capped, uncapped)


def test_capacity_holds_every_decode_shape_and_keeps_the_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CAPACITY_VARS:
        monkeypatch.delenv(name, raising=False)
    assert kernel_cache_capacity(16) > 5 * 16  # every weight shape at every decode row count
    assert kernel_cache_capacity(16) > kernel_cache_capacity(4)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    assert bound_kernel_caches(4) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(kernel_cache_capacity(4)),
                                      "LRU_CACHE_CAPACITY": "7"}  # fmt: skip
