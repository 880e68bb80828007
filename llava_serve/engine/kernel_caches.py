"""oneDNN's per-shape kernel caches, bounded to what the engine's decode steps use.

The CPU decoder multiplies by oneDNN-prepacked weights (`decoder_weights.Linear`, `prepack.py`), and
oneDNN compiles a kernel for every new row count: a prompt chunk of 37 tokens beside 5 decode rows
is a 42-row call at each of the layer's weight shapes. Two caches keep those kernels, ideep's (per
thread; `LRU_CACHE_CAPACITY`) and oneDNN's own (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`), each 1024
entries by default, and an entry holds about 0.3-0.6 MiB whatever the layer's size (measured here:
200 row counts on one packed weight grew the heap by 106 MiB uncapped, by 6.5 MiB with both at 16;
`tests/engine/test_kernel_caches.py`). Chunk sizes vary from step to step (the scheduler sizes
them from measured step costs), so a worker kept adding kernels for hours: a 3-minute soak of the
tiny model saw a worker's RSS climb from 400 to 556 MiB and still creep.

So the engine's process caps both at what its steady work needs: a decode step's row counts (1 to
max_rows) at each weight shape, for each thread count the tuner tries, plus room for the chunked
steps' shapes. A chunk shape that fell out costs one compile when it comes back (0.5-1 ms per weight
shape here, against a chunked step of tens of ms); decode shapes are used every step and stay.

Both caches read their capacity once, when the first kernel is made (oneDNN's is process-wide,
ideep's is per thread), so `bound_kernel_caches` must run before the model is loaded and packed; a
capacity the user set in the environment is kept.
"""

from __future__ import annotations

import os

CAPACITY_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# weight shapes a decoder layer step multiplies: fused QKV, output, fused gate-up, down, and the head
WEIGHT_SHAPES = 5
THREAD_COUNTS = 2  # the tuner's current thread count and the one it probes (oneDNN keys kernels by it)
CHUNK_ROOM = 64  # entries for the chunked steps' row counts (they churn; decode shapes do not)


def kernel_cache_capacity(max_rows: int) -> int:
    """Entries that hold every decode step's kernels (1..max_rows rows) plus room for chunks."""
    return WEIGHT_SHAPES * THREAD_COUNTS * max(1, max_rows) + CHUNK_ROOM


def bound_kernel_caches(max_rows: int) -> dict[str, str]:
    """Cap both caches for an engine of `max_rows` streams (unless the environment already sets
    them); returns the capacities in force. Call before the first oneDNN kernel of the process."""
    capacity = str(kernel_cache_capacity(max_rows))
    return {name: os.environ.setdefault(name, capacity) for name in CAPACITY_VARS}
