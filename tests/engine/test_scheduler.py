"""The scheduler's row bookkeeping and chunk sizes, and the prefix cache's matching rules."""

from __future__ import annotations

import torch

from llava_serve.engine.params import SamplingParams
from llava_serve.engine.prefix_cache import PrefixCache
from llava_serve.engine.request import Request
from llava_serve.engine.scheduler import MIN_CHUNK, Scheduler
from llava_serve.models.base import EncodedPrompt

IMAGE = 99


class Rows:
    """Records what the scheduler asks of the KV storage."""

    def __init__(self) -> None:
        self.moves: list[tuple[int, int, int]] = []
        self.in_use: list[int] = []

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.moves.append((src, dst, length))

    def use_rows(self, rows: int) -> None:
        self.in_use.append(rows)


def request(prompt_len: int) -> Request:
    return Request(EncodedPrompt(list(range(prompt_len))), SamplingParams(max_new_tokens=4), lambda out: None)


def run_prefill(sched: Scheduler) -> Request:
    batch = sched.schedule()
    assert batch.prefill is not None
    batch.prefill.num_computed = batch.prefill.prompt_len
    sched.promote(batch.prefill)
    batch.prefill.output_ids.append(1)
    return batch.prefill


def test_prompts_are_read_in_chunks_only_beside_decode_rows() -> None:
    sched = Scheduler(max_running=4, rows=Rows(), step_tokens=20)
    a, b = request(50), request(50)
    sched.add(a)
    sched.add(b)
    assert sched.schedule().chunk == 50  # nothing decodes: the whole prompt at once
    a.num_computed = 50
    sched.promote(a)
    batch = sched.schedule()
    assert batch.decode == [a] and batch.prefill is b and batch.chunk == 19  # 1 decode row + 19
    for _ in range(3):
        sched.add(request(10))
    b.num_computed = 50
    sched.promote(b)
    for _ in range(2):
        run_prefill(sched)
    batch = sched.schedule()
    assert len(batch.decode) == 4 and batch.prefill is None  # the batch is full: the last one waits
    unchunked = Scheduler(max_running=4, rows=Rows(), step_tokens=None)
    unchunked.add(request(500))
    unchunked.running = [request(3)]
    assert unchunked.schedule().chunk == 500
    crowded = Scheduler(max_running=64, rows=Rows(), step_tokens=20)
    crowded.running = [request(3) for _ in range(30)]
    crowded.add(request(100))
    assert crowded.schedule().chunk == MIN_CHUNK


def test_a_leaving_row_is_filled_by_the_last_and_the_prefill_row_follows() -> None:
    rows = Rows()
    sched = Scheduler(max_running=4, rows=rows, step_tokens=16)
    first, second, third = (request(5 + i) for i in range(3))
    for req in (first, second, third):
        sched.add(req)
        run_prefill(sched)
    late = request(40)
    sched.add(late)
    sched.schedule()
    late.num_computed = 12  # a chunk read into row 3
    sched.finish(first)
    assert sched.running == [third, second]
    assert rows.moves == [(2, 0, third.prompt_len + 1), (3, 2, 12)]
    assert rows.in_use[-1] == 3
    sched.finish(late)  # cancelled mid-prompt: nothing to move
    assert sched.prefilling is None and rows.in_use[-1] == 2


def kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(2, n, 4), torch.zeros(2, n, 4))]


def test_prefix_cache_matches_text_and_only_the_same_images() -> None:
    cache = PrefixCache(max_bytes=1 << 20, image_token_id=IMAGE)
    turn1 = [1, 2, 3, IMAGE, IMAGE, 7, 8, 9]
    cache.store(turn1, ["img-a"], kv(len(turn1)))
    assert cache.lookup([*turn1, 10, 11], ["img-a"])[0] == len(turn1)
    assert cache.lookup(turn1, ["img-a"])[0] == len(turn1) - 1  # the last token always runs
    assert cache.lookup([*turn1, 10], ["img-b"])[0] == 3  # another picture: only the text before it
    assert cache.lookup([1, 2, 5], [])[0] == 2
    cache.store([4, 5, IMAGE], ["anon-1"], kv(3))  # no content key: never kept
    assert len(cache.entries) == 1


def test_prefix_cache_is_bounded_by_bytes() -> None:
    one = sum(k.numel() * 4 + v.numel() * 4 for k, v in kv(10))
    cache = PrefixCache(max_bytes=3 * one, image_token_id=None)
    for start in (0, 100, 200, 300):
        cache.store(list(range(start, start + 10)), [], kv(10))
    assert [e.tokens[0] for e in cache.entries] == [100, 200, 300]  # the oldest went
    cache.store(list(range(100, 115)), [], kv(15))  # extends the entry for 100, which goes
    assert [e.tokens[0] for e in cache.entries] == [300, 100]  # and 200 makes room
