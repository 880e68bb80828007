"""SlotCache storage: rows and columns grow on demand, contents survive growth, empty frees."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llava_serve.engine.kv import SlotCache

HEADS, DIM, LAYERS = 2, 4, 3


def prefill(length: int, seed: int) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    layers = [
        SimpleNamespace(
            keys=torch.randn(1, HEADS, length, DIM, generator=gen),
            values=torch.randn(1, HEADS, length, DIM, generator=gen),
        )
        for _ in range(LAYERS)
    ]
    return SimpleNamespace(layers=layers)


def row_contents(cache: SlotCache, row: int, length: int) -> torch.Tensor:
    """The last `length` real columns of a row, all layers, keys and values."""
    layers = cache.slot_layers
    return torch.stack([torch.stack([lay.keys[row, :, -length:], lay.values[row, :, -length:]]) for lay in layers])


def expected(p: SimpleNamespace) -> torch.Tensor:
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in p.layers])


def test_rows_grow_on_demand_and_contents_survive() -> None:
    cache = SlotCache(LAYERS, max_rows=8)
    lengths = [5, 9, 3, 40, 7]
    prefills = [prefill(n, i) for i, n in enumerate(lengths)]
    for i, (p, n) in enumerate(zip(prefills, lengths, strict=True)):
        assert cache.add_row(p, n) == i
        assert cache.row_capacity <= max(1, 2 * (i + 1)), "rows are allocated as needed, not max_rows at once"
    assert cache.row_capacity == 8 and cache.length == 40 and cache.capacity >= 41
    for i, (p, n) in enumerate(zip(prefills, lengths, strict=True)):
        assert torch.equal(row_contents(cache, i, n), expected(p))
        assert cache.mask is not None and int(cache.mask[i].sum()) == n
    for _ in range(200):  # decode steps: columns grow by doubling, rows keep their contents
        cache.begin_step()
        for layer in cache.slot_layers:
            layer.update(torch.zeros(5, HEADS, 1, DIM), torch.zeros(5, HEADS, 1, DIM))
        cache.end_step()
    assert cache.length == 240 and cache.capacity >= 241
    assert torch.equal(row_contents(cache, 1, 209)[..., :9, :], expected(prefills[1]))


def test_remove_moves_the_last_row_and_empty_frees_storage() -> None:
    cache = SlotCache(LAYERS, max_rows=4)
    a, b, c = prefill(6, 1), prefill(6, 2), prefill(6, 3)
    for p in (a, b, c):
        cache.add_row(p, 6)
    cache.move_row(2, 0)  # a leaves: c moves into row 0 (the scheduler's order)
    cache.use_rows(2)
    assert torch.equal(row_contents(cache, 0, 6), expected(c))
    assert torch.equal(row_contents(cache, 1, 6), expected(b))
    cache.use_rows(1)
    cache.use_rows(0)
    assert cache.batch == 0 and cache.mask is None and cache.capacity == 0
    assert all(layer.kbuf is None for layer in cache.slot_layers)
    cache.add_row(a, 6)  # and it comes back
    assert torch.equal(row_contents(cache, 0, 6), expected(a))


def test_slots_grow_keep_the_live_rows_and_move_rows() -> None:
    from llava_serve.engine.slots import KVSlots

    slots = KVSlots(num_layers=2, kv_heads=HEADS, head_dim=DIM, max_rows=8, max_len=512)
    slots.ensure(2, 10)
    assert (slots.rows, slots.cols) == (2, 64)
    for layer in slots.keys:
        layer[0, :, :10] = 1.0
        layer[1, :, :10] = 2.0
    slots.ensure(3, 100)  # both dimensions grow; rows 0-1 are live
    assert (slots.rows, slots.cols) == (4, 128)
    assert all(float(k[0, :, :10].min()) == 1.0 and float(k[1, :, :10].min()) == 2.0 for k in slots.keys)
    assert all(float(k[:, :, 10:].abs().max()) == 0.0 for k in slots.keys)
    slots.move_row(1, 0, 10)
    assert all(float(k[0, :, :10].min()) == 2.0 for k in slots.keys)
    saved = slots.read_row(0, 10)
    slots.write_row(2, saved, 10)
    assert all(torch.equal(k[2, :, :10], k[0, :, :10]) for k in slots.keys)
    slots.free()
    assert slots.rows == 0 and slots.keys == []


def test_slots_grow_only_the_dimension_that_is_too_small() -> None:
    """Rows 1 -> 16 must not double the columns at each row growth (they did: 32x the memory)."""
    from llava_serve.engine.slots import KVSlots

    slots = KVSlots(num_layers=1, kv_heads=HEADS, head_dim=DIM, max_rows=16, max_len=4096)
    slots.ensure(1, 100)
    assert (slots.rows, slots.cols) == (1, 100)
    for rows in range(2, 17):
        slots.ensure(rows, 100)
    assert (slots.rows, slots.cols) == (16, 100)
    slots.ensure(16, 101)  # columns double; rows stay
    assert (slots.rows, slots.cols) == (16, 200)
    slots.ensure(16, 3000)  # beyond the doubling: what is asked
    assert slots.cols == 3000
    slots.ensure(16, 4000)  # the doubling is capped at the context length
    assert slots.cols == 4096
