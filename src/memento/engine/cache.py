"""KV storage that can forget: a paged pool whose rows are compacted in place.

Keys/values live in fixed-size pages, one tensor for the whole cache,
`[layers, 2 (keys, values), pages, kv_heads, page_size, head_dim]` (per-layer keys/values are
views). Row `r` belongs to one running request: its slots `0..lengths[r]-1` hold that request's
cached tokens in increasing logical order, slot `s` in page `pages[r][s // page_size]` at offset
`s % page_size`; `positions[page, offset]` is the slot's original (logical) position (sliding
windows are measured in those, never in slots). Evicting a logical span removes a run of slots
from one row (its tail moves left, over every layer at once) and returns the pages it no longer
needs; rows evict at different times without touching the rest of the batch.

Why pages: memory follows the tokens actually cached, not `rows x longest row`. The pages in use
are always a prefix of the pool (a freed page is filled by moving the last one in), so with a KV
budget the pool never holds more than `ceil(budget / page_size) + max_rows` pages, and a decode
step attends over the used prefix *in place*: every page's keys meet the query of the row that
owns it (one batched matmul over pages), and a softmax reduced per row combines them
(`decode_attention`; no gather of the cache, no padding to the longest row). A forward through a
stock HF model instead gets each row's keys gathered into a padded `[rows, heads, keys, dim]`
view from `update()`, as it expects.

The cache is handed to an HF model as its cache argument (`memento.hf.with_cache`): the model only
calls `update()`, which writes the new keys and returns what the attention needs; the engine
supplies the matching boolean mask. (The same compaction on a stock `transformers.DynamicCache`:
`memento.hf.remove_span`.)
"""

from __future__ import annotations

import torch

from memento.hf import CacheBase

PAGE_SIZE = 32  # tokens per page (vLLM's CPU block size: same fragmentation in side-by-side runs)
FIRST_PAGES = 64  # pages allocated up front when there is no cap (grows by doubling)


class PagedKVCache(CacheBase):
    """Paged per-row KV cache with in-place row compaction (see the module docstring).

    `max_tokens` (the engine's KV budget) and `max_rows` (its batch size) cap the pool at
    `ceil(max_tokens / page_size) + max_rows` pages: enough for any set of rows whose cached
    tokens fit in `max_tokens` (each row wastes less than one page). Without `max_tokens` the pool
    grows by doubling as needed."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        page_size: int = PAGE_SIZE,
        max_tokens: int | None = None,
        max_rows: int = 1,
    ) -> None:
        super().__init__()
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_layers = num_layers
        self.shape = (num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.page_size = page_size
        self.page_limit = None if max_tokens is None else -(-max_tokens // page_size) + max_rows
        first = FIRST_PAGES if self.page_limit is None else min(FIRST_PAGES, self.page_limit)
        self._allocate(first)
        self.lengths: list[int] = []  # per row: valid slots
        self.pages: list[list[int]] = []  # per row: its pages, in slot order
        self.num_rows = 0  # rows 0..num_rows-1 are in use
        self.num_pages = 0  # pages 0..num_pages-1 are in use
        self.peak_pages = 0
        self._page_row: list[int] = []  # the row owning each page in use
        self._owner: torch.Tensor | None = None  # `_page_row` on the device (rebuilt when stale)
        self._plan: tuple | None = None
        self._decode_bias: dict = {}

    # --- storage ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _allocate(self, pages: int) -> None:
        """(Re)allocate the pool for `pages` pages, keeping the pages in use."""
        heads, dim = self.shape
        bs = self.page_size
        storage = torch.empty(self.num_layers, 2, pages, heads, bs, dim, dtype=self.dtype, device=self.device)
        positions = torch.zeros(pages, bs, dtype=torch.long, device=self.device)
        # additive attention bias of every slot: 0 = holds a token, -inf = empty
        bias = torch.full((pages, bs), float("-inf"), device=self.device)
        used = getattr(self, "num_pages", 0)
        if used:
            storage[:, :, :used] = self.storage[:, :, :used]
            positions[:used] = self.positions[:used]
            bias[:used] = self.bias[:used]
        self.storage, self.positions, self.bias = storage, positions, bias
        self.keys = [storage[i, 0] for i in range(self.num_layers)]  # `[pages, heads, page_size, dim]`
        self.values = [storage[i, 1] for i in range(self.num_layers)]

    @property
    def pool_pages(self) -> int:
        return self.storage.shape[2]

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one cached token over all layers (keys and values)."""
        heads, dim = self.shape
        return self.num_layers * 2 * heads * dim * self.storage.element_size()

    def allocated_bytes(self) -> int:
        """Bytes the pool holds (pages, their positions and validity), used or not."""
        return self.storage.nbytes + self.positions.nbytes + self.bias.nbytes

    def used_bytes(self) -> int:
        """KV bytes of the pages in use (cached tokens plus the unfilled rest of each row's last page)."""
        return self.num_pages * self.page_size * self.bytes_per_token

    def total_tokens(self) -> int:
        """Valid cached tokens over all rows in use (what the KV budget counts)."""
        return sum(self.lengths[: self.num_rows])

    @property
    def row_capacity(self) -> int:
        """Rows with bookkeeping (rows hold no storage of their own: any number fits)."""
        return len(self.lengths)

    @torch.inference_mode()
    def _new_page(self, row: int) -> int:
        if self.num_pages == self.pool_pages:
            grow = 2 * self.pool_pages
            if self.page_limit is not None and self.num_pages < self.page_limit:
                grow = min(grow, self.page_limit)
            self._allocate(grow)
        page = self.num_pages
        self.num_pages += 1
        self.peak_pages = max(self.peak_pages, self.num_pages)
        self._page_row.append(row)
        self._owner = None
        self.pages[row].append(page)
        self.storage[:, :, page].zero_()  # empty slots are masked, but must stay finite (0 * NaN = NaN)
        self.bias[page] = float("-inf")
        return page

    def _ensure_slots(self, row: int, length: int) -> None:
        while len(self.pages[row]) * self.page_size < length:
            self._new_page(row)

    @torch.inference_mode()
    def _free_pages(self, freed: list[int]) -> None:
        """Return pages to the pool, keeping the pages in use a prefix: each hole below the new end
        is filled by one of the used pages above it (data, positions, bias and owner move)."""
        if not freed:
            return
        gone = set(freed)
        end = self.num_pages - len(gone)
        holes = sorted(p for p in gone if p < end)
        movers = [p for p in range(end, self.num_pages) if p not in gone]
        if holes:
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            self.storage[:, :, dst] = self.storage[:, :, src]
            self.positions[dst] = self.positions[src]
            self.bias[dst] = self.bias[src]
            for hole, mover in zip(holes, movers, strict=True):
                row = self._page_row[mover]
                self._page_row[hole] = row
                table = self.pages[row]
                table[table.index(mover)] = hole
        del self._page_row[end:]
        self.num_pages = end
        self._owner = None

    def _slots(self, row: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) of each of a row's `slots` (a tensor on the cache's device)."""
        table = torch.tensor(self.pages[row], dtype=torch.long, device=self.device)
        return table[slots // self.page_size], slots % self.page_size

    def _spans(self, rows: list[int], spans: list[tuple[int, int, int]], *, start_at_offset: bool):
        """For spans `(i, start, count)` of slots of row `rows[i]`: the batch index `i` and the
        index within the span (`start_at_offset`) or the slot itself, then page and offset, of
        every slot, as four flat tensors."""
        device = self.device
        index, within, pages, offsets = [], [], [], []
        bs = self.page_size
        for i, start, count in spans:
            table = torch.tensor(self.pages[rows[i]], dtype=torch.long, device=device)
            slots = torch.arange(start, start + count, device=device)
            index.append(torch.full((count,), i, device=device))
            within.append(slots - start if start_at_offset else slots)
            pages.append(table[slots // bs])
            offsets.append(slots % bs)
        return tuple(torch.cat(parts) for parts in (index, within, pages, offsets))

    # --- rows -------------------------------------------------------------------------------

    def add_row(self) -> int:
        """Claim the next free row (empty) and return its index."""
        row = self.num_rows
        if row == len(self.lengths):
            self.lengths.append(0)
            self.pages.append([])
        self.num_rows += 1
        self.lengths[row] = 0
        self.pages[row] = []
        return row

    def reset(self) -> None:
        """Drop every row and page (the pool stays allocated)."""
        self.num_rows = 0
        self.num_pages = 0
        self._page_row = []
        self._owner = None
        self.lengths = [0] * len(self.lengths)
        self.pages = [[] for _ in self.pages]

    def release_row(self, row: int) -> int | None:
        """Free `row` and its pages; the last used row moves into its place to keep rows
        contiguous (only its page table moves, not its data).

        Returns the index of the row that moved into `row` (its old index), or None."""
        self._free_pages(self.pages[row])
        last = self.num_rows - 1
        moved = None
        if row != last:
            self.pages[row], self.lengths[row] = self.pages[last], self.lengths[last]
            for page in self.pages[row]:
                self._page_row[page] = row
            self._owner = None
            moved = last
        self.pages[last] = []
        self.lengths[last] = 0
        self.num_rows -= 1
        return moved

    @torch.inference_mode()
    def remove_slots(self, row: int, start: int, end: int) -> None:
        """Compaction primitive: drop slots `[start, end)` of one row; later slots move left (one
        gather and one scatter over every layer at once); pages no longer needed are freed."""
        n = self.lengths[row]
        end = min(end, n)
        if end <= start:
            return
        gap = end - start
        if end < n:
            self._move_left(row, start, n - gap, gap)
        self._shrink(row, n - gap)

    def _move_left(self, row: int, start: int, stop: int, gap: int) -> None:
        """Slots `[start, stop)` of `row` take the contents of slots `gap` further right. The
        partial page at `start` moves slot by slot; every later page is filled from (at most) two
        source pages with two slices each, all pages at once (sources read before any write)."""
        bs = self.page_size
        table = self.pages[row]
        storage, positions = self.storage, self.positions
        head = min(stop, -(-start // bs) * bs)  # end of the page holding `start`
        if start < head:
            dp, do = self._slots(row, torch.arange(start, head, device=self.device))
            sp, so = self._slots(row, torch.arange(start + gap, head + gap, device=self.device))
            storage[:, :, dp, :, do] = storage[:, :, sp, :, so]
            positions[dp, do] = positions[sp, so]
        first, last = -(-head // bs), -(-stop // bs)  # whole destination pages [first, last)
        if first >= last:
            return
        shift, r = divmod(gap, bs)  # dst offset x < bs - r reads page j + shift, the rest j + shift + 1
        dst = torch.tensor(table[first:last], device=self.device)
        src_a = torch.tensor(table[first + shift : last + shift], device=self.device)
        top = len(table) - 1  # past the row's last page there is nothing to read (slots beyond stop)
        src_b = torch.tensor([table[min(j + shift + 1, top)] for j in range(first, last)], device=self.device)
        # whole-page gathers and scatters (index_select / index_copy_ over the page dimension of
        # slot-range views: contiguous runs, unlike per-slot advanced indexing)
        parts = [(slice(0, bs - r), src_a, slice(r, bs))]
        if r:
            parts.append((slice(bs - r, bs), src_b, slice(0, r)))
        moved = [
            (storage[:, :, :, :, cut].index_select(2, src), positions[:, cut].index_select(0, src))
            for _, src, cut in parts
        ]
        for (target, _, _), (data, pos) in zip(parts, moved, strict=True):
            storage[:, :, :, :, target].index_copy_(2, dst, data)
            positions[:, target].index_copy_(0, dst, pos)

    @torch.inference_mode()
    def truncate(self, row: int, length: int) -> None:
        """Keep only the first `length` slots of `row` (restart mode rewinds)."""
        self._shrink(row, min(self.lengths[row], length))

    def _shrink(self, row: int, length: int) -> None:
        self.lengths[row] = length
        table = self.pages[row]
        keep = -(-length // self.page_size)
        if length % self.page_size:  # the slots after the new end of the last page are empty now
            self.bias[table[keep - 1], length % self.page_size :] = float("-inf")
        freed = table[keep:]
        del table[keep:]
        self._free_pages(freed)

    def row_kv(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's cached keys and values of one layer, `[heads, length, dim]` each (a copy)."""
        pages, offsets = self._slots(row, torch.arange(self.lengths[row], device=self.device))
        keys = self.keys[layer][pages, :, offsets].transpose(0, 1)
        return keys, self.values[layer][pages, :, offsets].transpose(0, 1)

    def row_positions(self, row: int) -> list[int]:
        pages, offsets = self._slots(row, torch.arange(self.lengths[row], device=self.device))
        return self.positions[pages, offsets].tolist()

    # --- forward plans (set by the runner right before a model call) ----------------------

    def decode_slots(self, rows: int) -> tuple[list[int], list[int]]:
        """Make room for one more token at the end of rows `0..rows-1`; returns the (page,
        offset) it goes to in each row (the runner sends them with the step's other inputs)."""
        bs = self.page_size
        pages, offsets = [], []
        for r in range(rows):
            n = self.lengths[r]
            if n == len(self.pages[r]) * bs:
                self._new_page(r)
            pages.append(self.pages[r][n // bs])
            offsets.append(n % bs)
        return pages, offsets

    def plan_decode(
        self, rows: int, pages: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor, *, paged: bool
    ) -> int:
        """Next forward writes one token per row `0..rows-1` at (`pages`, `offsets`) (from
        `decode_slots`), at logical `positions` (recorded now). With `paged`, the attention reads
        the pool in place (`decode_attention`); else `update()` returns each row's keys gathered
        into a padded view. Returns the key length of that padded view (max row length + 1)."""
        self.positions[pages, offsets] = positions
        self.bias[pages, offsets] = 0.0
        key_len = max(self.lengths[:rows]) + 1
        gather = None
        if not paged:
            bs = self.page_size
            width = -(-key_len // bs)
            table = torch.zeros(rows, width, dtype=torch.long)
            for r in range(rows):
                table[r, : len(self.pages[r])] = torch.tensor(self.pages[r])
            slots = torch.arange(key_len)
            gather = (table[:, slots // bs].to(self.device), (slots % bs).to(self.device))
        self._plan = ("decode", rows, pages, offsets, positions, gather, key_len)
        self._decode_bias = {}
        return key_len

    def padded_positions(self) -> torch.Tensor:
        """Logical position of each slot of the padded decode view, `[rows, key_len]` (slots past
        a row's end hold stale values: the runner's mask hides them)."""
        gather = self._plan[5]
        return self.positions[gather[0], gather[1]]

    def plan_extend(
        self, rows: list[int], counts: list[int], width: int, positions: torch.Tensor | None = None
    ) -> int:
        """Next forward writes `width` tokens (right-padded) at the end of each of `rows`: row
        `rows[i]` gets `counts[i]` real tokens at logical `positions[i]` (recorded now); padding
        is not stored. The attention sees, per row, its cached slots then the `width` new ones
        (`[rows, heads, key_len, dim]`). Returns that key length (max offset + width)."""
        device = self.device
        offsets = [self.lengths[r] for r in rows]
        for r, offset, count in zip(rows, offsets, counts, strict=True):
            self._ensure_slots(r, offset + count)
        # the real tokens' (batch row, token index) and where they go; padding is not stored
        real = [(i, offset, count) for i, (offset, count) in enumerate(zip(offsets, counts, strict=True))]
        write_rows, write_tokens, pages, slot_offsets = self._spans(rows, real, start_at_offset=True)
        write = (write_rows, write_tokens, pages, slot_offsets)
        if positions is not None:
            self.positions[pages, slot_offsets] = positions.to(device)[write_rows, write_tokens]
        self.bias[pages, slot_offsets] = 0.0
        key_len = max(offsets) + width
        cached = None
        if max(offsets):  # rows with cached slots: gather them in front of the new tokens
            spans = [(i, 0, offset) for i, offset in enumerate(offsets) if offset]
            c_rows, c_slots, c_pages, c_offsets = self._spans(rows, spans, start_at_offset=False)
            new_slots = torch.tensor(offsets, device=device)[:, None] + torch.arange(width, device=device)
            row_index = torch.arange(len(rows), device=device)[:, None]
            cached = (c_rows, c_slots, c_pages, c_offsets, row_index, new_slots)
        self._plan = ("extend", rows, counts, write, cached, key_len)
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

    # --- the model's side: store new keys, return (or compute) what the attention sees -------

    @property
    def paged_decode(self) -> bool:
        """The planned forward is a decode step whose attention reads the pool in place."""
        plan = self._plan
        return plan is not None and plan[0] == "decode" and plan[5] is None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by every attention layer: store the new keys/values, return what to attend to.
        (Extra arguments differ between transformers releases: `cache_kwargs` positionally before
        5.24, `kwargs=` from 5.24 on; neither carries anything this cache needs.)"""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        plan = self._plan
        if plan is None:
            raise RuntimeError("PagedKVCache.update called without a forward plan")
        if plan[0] == "decode":
            _, rows, pages, offsets, _, gather, _ = plan
            k[pages, :, offsets] = key_states[:, :, 0]
            v[pages, :, offsets] = value_states[:, :, 0]
            if gather is None:
                raise RuntimeError("a paged decode step reads the cache through decode_attention()")
            # advanced indices around a slice: the result is [rows, key_len, heads, dim]
            return k[gather[0], :, gather[1]].transpose(1, 2), v[gather[0], :, gather[1]].transpose(1, 2)
        _, rows, _, write, cached, key_len = plan
        rows_i, tokens_i, pages, offsets = write
        k[pages, :, offsets] = key_states.transpose(1, 2)[rows_i, tokens_i]
        v[pages, :, offsets] = value_states.transpose(1, 2)[rows_i, tokens_i]
        if cached is None:  # no cached slots: the new keys are all the attention sees
            return key_states, value_states
        c_rows, c_slots, c_pages, c_offsets, row_index, new_slots = cached
        out = []
        for pool, new in ((k, key_states), (v, value_states)):
            batch, heads, _, dim = new.shape
            full = new.new_zeros(batch, heads, key_len, dim)
            full[c_rows, :, c_slots] = pool[c_pages, :, c_offsets]
            full[row_index, :, new_slots] = new.transpose(1, 2)
            out.append(full)
        return out[0], out[1]

    def decode_attention(
        self, query, key_states, value_states, layer_idx: int, scale: float, window: int | None = None
    ) -> torch.Tensor:
        """A paged decode step's attention for one layer: store the new keys/values, then attend
        from each row's query (`[rows, heads, 1, dim]`) to every slot of the pages it owns, in
        place. Scores are computed page by page (one batched matmul over the used pages, grouped
        query heads sharing their KV head), masked by the slot bias (empty slots, and for a sliding
        layer keys outside its window), and normalised per row (max and sum reduced over the row's
        pages). Returns `[rows, heads, 1, dim]`, as SDPA would."""
        _, rows, pages, offsets, positions, _, _ = self._plan
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[pages, :, offsets] = key_states[:, :, 0]
        v[pages, :, offsets] = value_states[:, :, 0]
        used = self.num_pages
        if self._owner is None:
            self._owner = torch.tensor(self._page_row, device=self.device)
        owner = self._owner
        bias = self._decode_bias.get(window)
        if bias is None:
            bias = self.bias[:used]
            if window is not None:
                outside = positions[owner][:, None] - self.positions[:used] >= window
                bias = bias.masked_fill(outside, float("-inf"))
            bias = self._decode_bias[window] = bias[:, None, None, :]
        heads, dim = query.shape[1], query.shape[3]
        kv_heads = k.shape[1]
        group = heads // kv_heads
        q = (
            (query * scale).reshape(rows, kv_heads, group, dim).index_select(0, owner)
        )  # [pages, kv, group, dim]
        scores = torch.matmul(q, k[:used].transpose(-1, -2)).float()  # [pages, kv, group, slot]
        scores += bias  # in place from here on: one buffer the size of the scores
        shape = (rows, kv_heads, group)
        index = owner[:, None, None].expand(used, kv_heads, group)
        peak = torch.full(shape, float("-inf"), device=self.device)
        peak = peak.scatter_reduce_(0, index, scores.amax(-1), "amax")
        scores -= peak.index_select(0, owner)[..., None]
        weights = scores.exp_()
        total = torch.zeros(shape, device=self.device).index_add_(0, owner, weights.sum(-1))
        partial = torch.matmul(weights.to(v.dtype), v[:used]).float()  # [pages, kv, group, dim]
        out = torch.zeros(*shape, dim, device=self.device).index_add_(0, owner, partial) / total[..., None]
        return out.reshape(rows, heads, 1, dim).to(query.dtype)

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
