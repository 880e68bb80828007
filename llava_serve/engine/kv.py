"""A batched KV cache whose rows are requests: rows join and leave between decode steps.

Rows are left-padded to a shared length T, so one decode step appends one column for all rows.
Storage grows by doubling, in columns and in rows (up to max_rows), so a step writes one column in
place instead of concatenating the whole cache (what DynamicCache does), and a lone request does
not pay for (allocate, zero, copy on growth) the rows of a full batch. A row that leaves is
replaced by the last row (one row copy, ordered by the scheduler); leading columns that are padding for every row are
trimmed; when the last row leaves, the storage is freed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None

    def allocate(self, like: torch.Tensor, rows: int, cols: int) -> None:
        _, heads, _, dim = like.shape
        self.kbuf = like.new_zeros(rows, heads, cols, dim)
        self.vbuf = like.new_zeros(rows, heads, cols, dim)
        self.is_initialized = True
        self.device = like.device

    def free(self) -> None:
        self.kbuf = self.vbuf = None
        self.keys = self.values = None  # type: ignore[assignment]
        self.is_initialized = False

    def refresh_views(self) -> None:
        b, t = self.owner.batch, self.owner.length
        assert self.kbuf is not None and self.vbuf is not None
        self.keys = self.kbuf[:b, :, :t]
        self.values = self.vbuf[:b, :, :t]

    def update(self, key_states, value_states, *args, **kwargs):  # type: ignore[override]
        b, t, q = self.owner.batch, self.owner.length, key_states.shape[-2]
        assert self.kbuf is not None and self.vbuf is not None
        self.kbuf[:b, :, t : t + q] = key_states
        self.vbuf[:b, :, t : t + q] = value_states
        self.keys = self.kbuf[:b, :, : t + q]
        self.values = self.vbuf[:b, :, : t + q]
        return self.keys, self.values


class SlotCache(Cache):
    def __init__(self, num_layers: int, max_rows: int) -> None:
        self.max_rows = max_rows
        self.batch = 0
        self.length = 0
        self.capacity = 0  # columns allocated
        self.row_capacity = 0  # rows allocated
        self.mask: torch.Tensor | None = None  # [row_capacity, capacity] 1 = real token
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[return-value]

    def add_row(self, prefill: Any, length: int) -> int:
        """Copy a one-request prefill cache in as a new last row; returns its index."""
        if self.batch >= self.max_rows:
            raise RuntimeError("KV cache has no free row")
        if self.mask is None:
            self._allocate(prefill.layers[0].keys, 1, max(64, 2 * length))
        self._ensure_rows(self.batch + 1)
        if length > self.length:
            self._shift_right(length - self.length)
        self._ensure_capacity(self.length + 1)
        assert self.mask is not None
        row, start = self.batch, self.length - length
        for layer, src in zip(self.slot_layers, prefill.layers):
            assert layer.kbuf is not None and layer.vbuf is not None
            layer.kbuf[row, :, start : self.length] = src.keys[0, :, :length]
            layer.vbuf[row, :, start : self.length] = src.values[0, :, :length]
        self.mask[row, :start] = 0
        self.mask[row, start : self.length] = 1
        self.batch += 1
        self._refresh()
        return row

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` over row `dst` (the scheduler moved a request); rows not added yet are skipped."""
        if src == dst or src >= self.batch or dst >= self.batch:
            return
        for layer in self.slot_layers:
            assert layer.kbuf is not None and layer.vbuf is not None
            layer.kbuf[dst, :, : self.length] = layer.kbuf[src, :, : self.length]
            layer.vbuf[dst, :, : self.length] = layer.vbuf[src, :, : self.length]
        assert self.mask is not None
        self.mask[dst, : self.length] = self.mask[src, : self.length]

    def use_rows(self, rows: int) -> None:
        """Keep rows [0, rows); the storage is freed when none is left."""
        if rows >= self.batch:
            return
        self.batch = rows
        if self.batch == 0:
            self._free()
            return
        self._trim()
        self._refresh()

    def begin_step(self) -> torch.Tensor:
        """Make room for one column; returns the attention mask for the step ([batch, length + 1])."""
        self._ensure_capacity(self.length + 1)
        assert self.mask is not None
        self.mask[: self.batch, self.length] = 1
        return self.mask[: self.batch, : self.length + 1]

    def end_step(self) -> None:
        self.length += 1
        self._refresh()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def _allocate(self, like: torch.Tensor, rows: int, cols: int) -> None:
        for layer in self.slot_layers:
            layer.allocate(like, rows, cols)
        self.mask = torch.zeros(rows, cols, dtype=torch.long, device=like.device)
        self.row_capacity, self.capacity = rows, cols

    def _free(self) -> None:
        for layer in self.slot_layers:
            layer.free()
        self.mask = None
        self.batch = self.length = self.capacity = self.row_capacity = 0

    def _ensure_rows(self, rows: int) -> None:
        if rows > self.row_capacity:
            self._resize(min(self.max_rows, max(rows, 2 * self.row_capacity)), self.capacity)

    def _ensure_capacity(self, cols: int) -> None:
        if cols > self.capacity:
            self._resize(self.row_capacity, max(cols, 2 * self.capacity))

    def _resize(self, rows: int, cols: int) -> None:
        """New zeroed storage of rows x cols with the live rows and columns copied over."""
        b, t = self.batch, self.length
        old = [(layer.kbuf, layer.vbuf) for layer in self.slot_layers]
        old_mask = self.mask
        assert old_mask is not None and old[0][0] is not None
        self._allocate(old[0][0], rows, cols)
        for layer, (kbuf, vbuf) in zip(self.slot_layers, old, strict=True):
            assert layer.kbuf is not None and layer.vbuf is not None and kbuf is not None and vbuf is not None
            layer.kbuf[:b, :, :t] = kbuf[:b, :, :t]
            layer.vbuf[:b, :, :t] = vbuf[:b, :, :t]
        assert self.mask is not None
        self.mask[:b, :t] = old_mask[:b, :t]

    def _shift_right(self, n: int) -> None:
        self._ensure_capacity(self.length + n + 1)
        b, t = self.batch, self.length
        for layer in self.slot_layers:
            for buf in (layer.kbuf, layer.vbuf):
                assert buf is not None
                buf[:b, :, n : n + t] = buf[:b, :, :t].clone()
                buf[:b, :, :n] = 0
        assert self.mask is not None
        self.mask[:b, n : n + t] = self.mask[:b, :t].clone()
        self.mask[:b, :n] = 0
        self.length += n

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row, when that saves enough."""
        assert self.mask is not None
        b, t = self.batch, self.length
        real = self.mask[:b, :t].any(dim=0)
        pad = int(real.float().argmax()) if bool(real.any()) else t
        if pad < 32 or pad * 4 < t:
            return
        for layer in self.slot_layers:
            for buf in (layer.kbuf, layer.vbuf):
                assert buf is not None
                buf[:b, :, : t - pad] = buf[:b, :, pad:t].clone()
        self.mask[:b, : t - pad] = self.mask[:b, pad:t].clone()
        self.length = t - pad

    def _refresh(self) -> None:
        for layer in self.slot_layers:
            if layer.kbuf is not None:
                layer.refresh_views()
