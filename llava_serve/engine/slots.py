"""KV storage for DecoderRunner: one row (slot) per running request, indexed by [row, position].

Why slots and not pages: on CPU a decode step is bound by reading the weights, and attention is
a few percent of it, so what matters is that a step writes one column in place and attends over
plain strided views (SDPA takes them as they are). A row per request gives exactly that with no
block tables and no gather; its cost is memory for the longest row in every row, which the
doubling below keeps to what the running requests use. vLLM's pages pay off where memory, not
the weight stream, is the limit (GPUs with many long requests); that is not this engine's case.

Rows are the scheduler's row order (its `running` list, then the request being prefilled); the
scheduler moves a row when a request leaves. Storage grows by doubling (rows up to `max_rows`,
columns up to `max_len`) and is freed when no row is in use.
"""

from __future__ import annotations

import torch


class KVSlots:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_rows: int, max_len: int) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_rows, self.max_len = max_rows, max_len
        self.keys: list[torch.Tensor] = []  # per layer [rows, kv_heads, cols, head_dim]
        self.values: list[torch.Tensor] = []
        self.rows = 0  # allocated
        self.cols = 0
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def configure(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device

    def ensure(self, rows: int, cols: int) -> None:
        """Room for rows [0, rows) and positions [0, cols)."""
        if rows <= self.rows and cols <= self.cols:
            return
        # each dimension doubles only when it is the one too small: growing rows must not double
        # the columns too (five row doublings, 1 -> 16 rows, made a 55-column cache 1,760 wide:
        # 32x the memory, a resize copy of seconds, and attention over views with a 32x stride)
        new_rows = self.rows if rows <= self.rows else max(rows, min(self.max_rows, 2 * self.rows))
        new_cols = self.cols if cols <= self.cols else max(cols, min(self.max_len, max(2 * self.cols, 64)))
        self._resize(new_rows, new_cols, live=min(rows, self.rows))

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (a request changed rows)."""
        if src == dst or src >= self.rows or length <= 0:
            return
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]

    def free(self) -> None:
        self.keys, self.values = [], []
        self.rows = self.cols = 0

    def read_row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of a row's first `length` positions, per layer (for the prefix cache)."""
        return [(k[row, :, :length].clone(), v[row, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def write_row(self, row: int, saved: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.ensure(row + 1, length + 1)
        for (k, v), kbuf, vbuf in zip(saved, self.keys, self.values):
            kbuf[row, :, :length] = k[:, :length]
            vbuf[row, :, :length] = v[:, :length]

    def _resize(self, rows: int, cols: int, live: int) -> None:
        """New storage with rows [0, live) copied over (the rows a caller of `ensure` uses are all
        of its rows; the ones above hold nothing anyone reads)."""
        shape = (rows, self.kv_heads, cols, self.head_dim)
        old_cols = self.cols
        new_keys, new_values = [], []
        for i in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if live:
                k[:live, :, :old_cols] = self.keys[i][:live]
                v[:live, :, :old_cols] = self.values[i][:live]
            new_keys.append(k)
            new_values.append(v)
        self.keys, self.values = new_keys, new_values
        self.rows, self.cols = rows, cols
