"""KV storage that can forget: a padded batched cache whose rows are compacted in place.

Each layer holds keys/values as `[rows, kv_heads, capacity, head_dim]` (views of one tensor for the
whole cache, `[layers, 2, rows, kv_heads, capacity, head_dim]`); row `r` belongs to one
running request and its first `lengths[r]` slots are valid, in increasing logical order;
`positions[r, s]` is the original (logical) position of slot `s` (sliding windows are measured in
those, never in slots). Evicting a
logical span removes a contiguous run of slots from one row (the tail moves left), so rows evict at
different times without touching the rest of the batch. Running requests occupy rows `0..n-1`, so a
batched decode reads plain slices (no gather copy of the whole cache per step).

The cache is handed to an HF model as its cache argument (`memento.hf.with_cache`): the model only
calls `update()`, which writes the new keys at each row's own offset and returns the view the
attention needs; the engine supplies the matching boolean mask. (The same compaction on a stock
`transformers.DynamicCache`: `memento.hf.remove_span`.)
"""

from __future__ import annotations

import torch

from memento.hf import CacheBase

MAX_MOVE_CHUNKS = 64  # remove_slots: most non-overlapping pieces before staging the tail in a copy


class BatchedKVCache(CacheBase):
    """Padded per-row KV cache with in-place row compaction (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rows: int = 1,
        capacity: int = 256,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.shape = (num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self._set_storage(self._zeros(rows, capacity))
        self.positions = torch.zeros(rows, capacity, dtype=torch.long, device=self.device)
        self.lengths: list[int] = [0] * rows
        self.num_rows = 0  # rows 0..num_rows-1 are in use
        self._plan: tuple | None = None
        self._arange: torch.Tensor | None = None

    # --- storage management ---------------------------------------------------------------

    @torch.inference_mode()
    def _zeros(self, rows: int, capacity: int) -> torch.Tensor:
        """One tensor `[layers, 2 (keys, values), rows, kv_heads, capacity, head_dim]` for the whole
        cache, so that moving a row's slots is one copy over every layer at once."""
        # Zeros, not empty: padded slots are masked out, but must stay finite (0 * NaN = NaN).
        heads, dim = self.shape
        return torch.zeros(
            self.num_layers, 2, rows, heads, capacity, dim, dtype=self.dtype, device=self.device
        )

    def _set_storage(self, storage: torch.Tensor) -> None:
        self.storage = storage
        self.keys = [storage[i, 0] for i in range(self.num_layers)]  # views `[rows, heads, cap, dim]`
        self.values = [storage[i, 1] for i in range(self.num_layers)]

    @property
    def capacity(self) -> int:
        return self.storage.shape[4]

    @property
    def row_capacity(self) -> int:
        return self.storage.shape[2]

    def total_tokens(self) -> int:
        """Valid cached tokens over all rows in use (what the KV budget counts)."""
        return sum(self.lengths[: self.num_rows])

    @torch.inference_mode()
    def reserve(self, rows: int | None = None, length: int | None = None) -> None:
        """Grow storage (doubling) so `rows` rows of `length` slots fit; existing data is kept."""
        rows = max(rows or 0, self.row_capacity)
        cap = self.capacity
        need = length or 0
        while cap < need:
            cap *= 2
        if rows == self.row_capacity and cap == self.capacity:
            return
        if rows > self.row_capacity:
            rows = max(rows, 2 * self.row_capacity)
        self.lengths += [0] * (rows - len(self.lengths))
        old = self.storage
        new = self._zeros(rows, cap)
        new[:, :, : old.shape[2], :, : old.shape[4]] = old
        self._set_storage(new)
        positions = torch.zeros(rows, cap, dtype=torch.long, device=self.device)
        positions[: self.positions.shape[0], : self.positions.shape[1]] = self.positions
        self.positions = positions

    def add_row(self) -> int:
        """Claim the next free row (empty) and return its index."""
        self.reserve(rows=self.num_rows + 1)
        row = self.num_rows
        self.num_rows += 1
        self.lengths[row] = 0
        return row

    @torch.inference_mode()
    def release_row(self, row: int) -> int | None:
        """Free `row`; the last used row moves into its place to keep rows contiguous.

        Returns the index of the row that moved into `row` (its old index), or None."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            n = self.lengths[last]
            self.storage[:, :, row, :, :n] = self.storage[:, :, last, :, :n]
            self.positions[row, :n] = self.positions[last, :n]
            self.lengths[row] = n
            moved = last
        self.lengths[last] = 0
        self.num_rows -= 1
        return moved

    @torch.inference_mode()
    def remove_slots(self, row: int, start: int, end: int) -> None:
        """Compaction primitive: drop slots `[start, end)` of one row; later slots move left."""
        n = self.lengths[row]
        end = min(end, n)
        if end <= start:
            return
        tail, gap = n - end, end - start
        cells = self.storage[:, :, row]  # [layers, 2, heads, capacity, dim]: every layer at once
        if tail and tail <= MAX_MOVE_CHUNKS * gap:
            # left to right in pieces no longer than the gap: a piece never overlaps its own
            # destination, and only overwrites slots already moved (one pass over the tail)
            for src in range(end, n, gap):
                count = min(gap, n - src)
                dst = src - gap
                cells[:, :, :, dst : dst + count] = cells[:, :, :, src : src + count]
        elif tail:  # a short gap before a long tail: stage it, per layer (contiguous per head)
            for t in self.keys + self.values:
                t[row, :, start : start + tail] = t[row, :, end:n].clone()
        if tail:
            self.positions[row, start : start + tail] = self.positions[row, end:n].clone()
        self.lengths[row] = n - gap

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first `length` slots of `row` (restart mode rewinds)."""
        self.lengths[row] = min(self.lengths[row], length)

    # --- forward plans (set by the runner right before a model call) ----------------------

    def plan_decode(
        self, rows: int, slots: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> int:
        """Next forward writes one token per row `0..rows-1` at each row's end (`slots`: the row
        lengths as a tensor on the cache's device, if the caller has it), at logical `positions`
        (recorded now); returns the key length the attention will see (max row length + 1)."""
        key_len = max(self.lengths[:rows]) + 1
        self.reserve(length=key_len)
        device = self.device
        if slots is None:
            slots = torch.tensor(self.lengths[:rows], device=device)
        if self._arange is None or self._arange.shape[0] < rows:
            self._arange = torch.arange(max(rows, self.row_capacity), device=device)
        if positions is not None:
            self.positions[self._arange[:rows], slots] = positions
        self._plan = ("decode", rows, self._arange[:rows], slots, key_len)
        return key_len

    def plan_extend(
        self, rows: list[int], counts: list[int], width: int, positions: torch.Tensor | None = None
    ) -> int:
        """Next forward writes `width` tokens (right-padded) at the end of each of `rows`: row
        `rows[i]` gets `counts[i]` real tokens at logical `positions[i]` (recorded now); its
        padding lands in slots past its length, which stay invalid. Returns the key length the
        attention will see (max offset + width)."""
        offsets = [self.lengths[r] for r in rows]
        key_len = max(offsets) + width
        self.reserve(length=key_len)
        if positions is not None:
            for i, (r, offset) in enumerate(zip(rows, offsets, strict=True)):
                self.positions[r, offset : offset + width] = positions[i].to(self.device)
        first = rows[0]
        contiguous = rows == list(range(first, first + len(rows)))
        if contiguous and len(set(offsets)) == 1:  # fresh prompts admitted together: plain slices
            self._plan = ("extend", rows, counts, (first, len(rows), offsets[0], width), key_len)
        else:
            device = self.device
            row_index = torch.tensor(rows, device=device)
            slot_index = torch.tensor(offsets, device=device)[:, None] + torch.arange(width, device=device)
            view = (first, len(rows)) if contiguous else row_index
            self._plan = ("scatter", rows, counts, (row_index[:, None], slot_index, view), key_len)
        return key_len

    def commit(self) -> None:
        """Account for the tokens the last forward wrote."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        if plan[0] == "decode":
            for r in range(plan[1]):
                self.lengths[r] += 1
        else:
            for r, count in zip(plan[1], plan[2], strict=True):
                self.lengths[r] += count

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by every attention layer: store the new keys/values, return what to attend to.
        (Extra arguments differ between transformers releases: `cache_kwargs` positionally before
        5.24, `kwargs=` from 5.24 on; neither carries anything this cache needs.)"""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        plan = self._plan
        if plan is None:
            raise RuntimeError("BatchedKVCache.update called without a forward plan")
        kind, key_len = plan[0], plan[-1]
        if kind == "decode":
            _, rows, row_index, slot_index, _ = plan
            k[row_index, :, slot_index] = key_states[:, :, 0]
            v[row_index, :, slot_index] = value_states[:, :, 0]
            return k[:rows, :, :key_len], v[:rows, :, :key_len]
        if kind == "extend":
            first, n, offset, width = plan[3]
            k[first : first + n, :, offset : offset + width] = key_states
            v[first : first + n, :, offset : offset + width] = value_states
            return k[first : first + n, :, :key_len], v[first : first + n, :, :key_len]
        row_index, slot_index, view = plan[3]
        # advanced indices around a slice: the indexed result is [rows, width, heads, dim]
        k[row_index, :, slot_index] = key_states.transpose(1, 2)
        v[row_index, :, slot_index] = value_states.transpose(1, 2)
        if isinstance(view, tuple):
            first, n = view
            return k[first : first + n, :, :key_len], v[first : first + n, :, :key_len]
        return k[view, :, :key_len], v[view, :, :key_len]

    # --- bits of the Cache interface a model may consult ----------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths[: self.num_rows], default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.num_layers
