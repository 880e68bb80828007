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


def run_prefill(sched: Scheduler) -> list[Request]:
    """One step in which every prompt of the batch is read whole; they start decoding."""
    batch = sched.schedule()
    for req in batch.prefill:
        req.num_computed = req.prompt_len
        sched.promote(req)
        req.output_ids.append(1)
    return batch.prefill


def test_one_newcomer_is_read_in_chunks_only_beside_decode_rows() -> None:
    sched = Scheduler(max_running=4, rows=Rows(), step_tokens=20, max_step_tokens=64)
    a, b = request(50), request(50)
    sched.add(a)
    batch = sched.schedule()
    assert batch.prefill == [a] and batch.chunks == [50]  # nothing decodes: the whole prompt at once
    a.num_computed = 50
    sched.promote(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.decode == [a] and batch.prefill == [b] and batch.chunks == [19]  # 1 decode row + 19
    for _ in range(3):
        sched.add(request(10))
    b.num_computed = 50
    sched.promote(b)
    assert len(run_prefill(sched)) == 2  # 2 decode rows, 2 free: 20 * 2 - 2 = 38 tokens, two prompts
    batch = sched.schedule()
    assert len(batch.decode) == 4 and batch.prefill == []  # the batch is full: the last one waits
    unchunked = Scheduler(max_running=4, rows=Rows(), step_tokens=None)
    unchunked.add(request(500))
    unchunked.add(request(500))
    unchunked.running = [request(3)]
    batch = unchunked.schedule()
    assert batch.chunks == [500] and len(unchunked.prefilling) == 1  # whole prompts, one a step
    crowded = Scheduler(max_running=64, rows=Rows(), step_tokens=20)
    crowded.running = [request(3) for _ in range(30)]
    crowded.add(request(100))
    assert crowded.schedule().chunks == [MIN_CHUNK]


def test_a_crowd_of_newcomers_is_read_in_large_steps_of_several_prompts() -> None:
    """Budget: step_tokens per request waiting for its first token, capped at max_step_tokens, less
    the decode rows; prompts are read in arrival order, several in one step."""
    sched = Scheduler(max_running=8, rows=Rows(), step_tokens=16, max_step_tokens=100)
    crowd = [request(30) for _ in range(6)]
    for req in crowd:
        sched.add(req)
    batch = sched.schedule()  # nothing decodes; 6 pending: min(100, 16 * 6) = 96 tokens
    # three whole prompts; the 6 tokens left are not worth a row (under MIN_CHUNK)
    assert batch.prefill == crowd[:3] and batch.chunks == [30, 30, 30]
    assert sched.prefilling == crowd[:3] and list(sched.waiting) == crowd[3:]
    for req, size in zip(batch.prefill, batch.chunks, strict=True):
        req.num_computed += size
    for req in crowd[:2]:
        sched.promote(req)
        req.output_ids.append(1)
    crowd[2].num_computed = 10  # as if it had been read only in part
    batch = sched.schedule()  # 2 decode; 4 pending: 16 * 4 - 2 = 62 tokens, the part-read one first
    assert batch.decode == crowd[:2]
    assert batch.prefill == crowd[2:5] and batch.chunks == [20, 30, 12]
    with_one = Scheduler(max_running=8, rows=Rows(), step_tokens=16, max_step_tokens=100)
    with_one.running = [request(3) for _ in range(3)]
    with_one.add(request(30))
    with_one.add(request(30))
    # 2 pending: 32 - 3 = 29 tokens; the second is not admitted for the 0 tokens left
    assert with_one.schedule().chunks == [29] and len(with_one.prefilling) == 1


def test_a_leaving_row_is_filled_by_the_last_and_the_prefill_rows_follow() -> None:
    rows = Rows()
    sched = Scheduler(max_running=5, rows=rows, step_tokens=32, max_step_tokens=64)
    first, second, third = (request(5 + i) for i in range(3))
    for req in (first, second, third):
        sched.add(req)
        run_prefill(sched)
    late, later = request(40), request(40)
    sched.add(late)
    sched.add(later)
    batch = sched.schedule()
    assert batch.prefill == [late, later]
    late.num_computed, later.num_computed = 29, 0  # rows 3 and 4
    sched.finish(first)
    assert sched.running == [third, second]
    assert rows.moves == [(2, 0, third.prompt_len + 1), (3, 2, 29), (4, 3, 0)]
    assert rows.in_use[-1] == 4
    sched.finish(late)  # cancelled mid-prompt: the one after it closes up
    assert sched.prefilling == [later] and rows.moves[-1] == (3, 2, 0) and rows.in_use[-1] == 3
    sched.finish(later)
    assert sched.prefilling == [] and rows.in_use[-1] == 2


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


PIECES = {1: "<s>", 2: "Q:", 3: " a", 4: "b", 5: " ab", 6: "?", 7: "\ufffd", 8: "\xef", 9: "\xbf", 10: "\xbd"}


def render(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def test_an_answer_sent_back_as_text_reuses_the_answers_own_ids() -> None:
    """The model said " a" "b" (ids 3, 4); the client sends the text " ab" back, which tokenizes as
    id 5. Token matching stops there; the text of 3, 4 equals that of 5, so the prompt takes 3, 4
    and the whole first turn is reused."""
    cache = PrefixCache(max_bytes=1 << 20, image_token_id=None, decode=render)
    turn1 = [1, 2, 3, 4]  # prompt [1, 2], the model's answer [3, 4] (its last token is fed in turn 2)
    cache.store(turn1, [], kv(4), answer_start=2)
    turn2 = [1, 2, 5, 2, 6]
    assert cache.lookup(turn2, [])[2] == turn2, "one id longer than the prompt: not without room for it"
    n, entry, ids = cache.lookup(turn2, [], max_len=6)
    assert ids == [1, 2, 3, 4, 2, 6] and n == 4 and entry is not None
    assert render(ids) == render(turn2)
    strict = PrefixCache(max_bytes=1 << 20, image_token_id=None, decode=render, match_answers=False)
    strict.store(turn1, [], kv(4), answer_start=2)
    assert strict.lookup(turn2, [], max_len=6) == (2, strict.entries[0], turn2)


def test_an_answer_is_matched_only_where_the_text_is_the_same() -> None:
    cache = PrefixCache(max_bytes=1 << 20, image_token_id=None, decode=render)
    cache.store([1, 2, 3, 4, 4], [], kv(5), answer_start=2)  # " abb"
    # the client stripped or edited the answer: " ab" then "?" -> the longest answer prefix whose
    # text the prompt has (" a" "b" = " ab") is taken, the rest is read
    n, _, ids = cache.lookup([1, 2, 5, 6, 6], [], max_len=6)
    assert ids == [1, 2, 3, 4, 6, 6] and n == 4
    # nothing of the answer's text in the prompt: token matching only
    n, _, ids = cache.lookup([1, 2, 6, 6], [])
    assert ids == [1, 2, 6, 6] and n == 2


def test_a_lossy_answer_reuses_its_ids_only_if_the_whole_prompt_renders_the_same() -> None:
    """Bytes that are not UTF-8 stream as U+FFFD (id 7 here), which tokenizes back to other ids."""

    def lossy(ids: list[int]) -> str:  # ids 8, 9, 10 alone are invalid bytes and render as U+FFFD
        return "".join("\ufffd" if i in (8, 9, 10) else PIECES[i] for i in ids)

    cache = PrefixCache(max_bytes=1 << 20, image_token_id=None, decode=lossy)
    cache.store([1, 2, 8, 3, 4], [], kv(5), answer_start=2)
    n, _, ids = cache.lookup([1, 2, 7, 3, 4, 6], [])
    assert ids == [1, 2, 8, 3, 4, 6] and n == 5
