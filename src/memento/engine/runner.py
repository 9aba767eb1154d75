"""Model forwards over the batched cache, with explicit position ids and a 4D boolean mask.

Positions are always the original logical ones (never inferred from the cache length, which
shrinks on eviction); the mask says which cached slots each query may see, so the model's own
causal-mask logic is bypassed entirely. transformers internals are reached only through
`memento.hf`.
"""

from __future__ import annotations

import torch

from memento.engine.cache import PagedKVCache
from memento.engine.direct import DirectForward
from memento.hf import AttentionSwap, cache_argument, layer_windows
from memento.masking import in_window


class ModelRunner:
    """Runs an HF causal LM one step at a time against a `PagedKVCache`."""

    def __init__(self, model, cache: PagedKVCache, direct: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        # Per layer: None (full attention) or its sliding window, in original positions.
        self.windows = layer_windows(model.config)
        self.distinct_windows = tuple(dict.fromkeys(self.windows))
        self.sliding = any(w is not None for w in self.windows)
        # Llama-family models run as plain tensor ops (same math, less per-step Python).
        self.direct = DirectForward.build(model, self.windows) if direct else None
        # Other models run their own forward with memento's attention function swapped in for
        # the call (boolean masks, GQA without copying the KV heads), whatever they were loaded with.
        self.swap = AttentionSwap(model)
        self.cache_arg = cache_argument(model)

    def _forward(self, **kwargs):
        if self.direct is not None:
            return self.direct(**kwargs)
        kwargs[self.cache_arg] = kwargs.pop("past_key_values")
        masks = kwargs["attention_mask"]
        if isinstance(masks, dict):  # one mask per window: each layer picks its own (memento.hf)
            kwargs["attention_mask"] = masks[self.distinct_windows[0]]
            kwargs["memento_masks"] = masks
        with self.swap.active():
            return self.model(**kwargs)

    def _window_masks(self, allowed: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor):
        """`allowed` (the block rule, `[n, q, k]`) as the forward's mask: one tensor for a model
        without sliding windows, else `{window: allowed & in_window}` per distinct window."""
        if not self.sliding:
            return allowed[:, None]
        return {w: (allowed & in_window(query_pos, key_pos, w))[:, None] for w in self.distinct_windows}

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each row `0..n-1`, appended at each row's end; returns `[n, V]` logits."""
        n = len(token_ids)
        pages, offsets = self.cache.decode_slots(n)
        # one host-to-device transfer per step: tokens, positions, row lengths, where the new KV goes
        step = torch.tensor(
            [token_ids, positions, self.cache.lengths[:n], pages, offsets], device=self.device
        )
        # the direct forward attends over the pages in place (no mask needed: empty slots and
        # windows are the cache's slot bias); an HF forward gets padded keys and this mask
        paged = self.direct is not None
        key_len = self.cache.plan_decode(n, step[3], step[4], step[1], paged=paged)
        masks = None
        if not paged:
            allowed = torch.arange(key_len, device=self.device) <= step[2, :, None]
            masks = self._window_masks(
                allowed[:, None, :], step[1, :, None, None], self.cache.padded_positions()[:, None, :]
            )
        out = self._forward(
            input_ids=step[0, :, None],
            position_ids=step[1, :, None],
            attention_mask=masks,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache.commit()
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def extend(
        self,
        row: int,
        token_ids: list[int],
        positions: list[int],
        key_positions: list[int],
        kill: dict[int, int] | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Several tokens appended to one row (prefill, recompute). Query `q` sees key `k` iff
        `k <= q` and `q < kill[k]`, over the row's cached slots then the new tokens (logical
        positions in `key_positions`). Returns the logits of the last token (or of all)."""
        if all_logits:
            return self.extend_batch(
                [row], [token_ids], [positions], [key_positions], [kill], all_logits=True
            )[0]
        return self.extend_batch([row], [token_ids], [positions], [key_positions], [kill])[0]

    @torch.inference_mode()
    def extend_batch(
        self,
        rows: list[int],
        token_ids: list[list[int]],
        positions: list[list[int]],
        key_positions: list[list[int]],
        kills: list[dict[int, int] | None],
        all_logits: bool = False,
    ) -> torch.Tensor:
        """`extend` for several rows in one forward (batched prefill): each row's new tokens are
        right-padded to the longest; row i's query `q` sees its key `k` iff `k <= q` and
        `q < kills[i][k]`. A padding query sees only its own slot (so it stays finite: its keys are
        written past the row's length and never seen by real queries). Returns `[rows, V]` logits
        of each row's last real token (`[rows, width, V]` for all positions with `all_logits`)."""
        counts = [len(t) for t in token_ids]
        if min(counts) < 1:
            raise ValueError("extend_batch needs at least one token per row")
        n, width = len(rows), max(counts)
        offsets = [self.cache.lengths[r] for r in rows]
        q = torch.zeros(n, width, dtype=torch.long)
        ids = torch.zeros(n, width, dtype=torch.long)
        for i, (count, offset) in enumerate(zip(counts, offsets, strict=True)):
            if len(key_positions[i]) != offset + count:
                raise ValueError(
                    f"row {rows[i]}: {len(key_positions[i])} key positions for {offset} + {count} slots"
                )
            q[i, :count] = torch.tensor(positions[i])
            ids[i, :count] = torch.tensor(token_ids[i])
        key_len = self.cache.plan_extend(rows, counts, width, q)
        big = torch.iinfo(torch.long).max
        k = torch.full((n, key_len), big, dtype=torch.long)  # empty slots: after every query
        kill = torch.full((n, key_len), big, dtype=torch.long)
        for i, (count, offset) in enumerate(zip(counts, offsets, strict=True)):
            k[i, : offset + count] = torch.tensor(key_positions[i])
            if kills[i]:
                index = {p: j for j, p in enumerate(key_positions[i])}
                for pos, t in kills[i].items():
                    if pos in index:
                        kill[i, index[pos]] = t
        last = torch.tensor(counts) - 1
        keep = torch.unique(last)
        causal = (
            max(offsets) == 0 and len(keep) == 1 and not any(kills) and list(key_positions) == list(positions)
        )
        # a window wider than the chunk never cuts a fresh causal prefill
        causal = causal and (not self.sliding or width <= min(w for w in self.windows if w is not None))
        if self.direct is not None and causal:
            # fresh rows, no padding, no kill times: the mask is plain causal (keys = queries, in
            # increasing position order), which SDPA computes without a mask and half the work
            out = self.direct(
                input_ids=ids.to(self.device),
                position_ids=q.to(self.device),
                attention_mask=None,
                past_key_values=self.cache,
                logits_to_keep=0 if all_logits else 1,
            )
            self.cache.commit()
            return out.logits.float() if all_logits else out.logits[:, -1].float()
        allowed = (k[:, None, :] <= q[:, :, None]) & (q[:, :, None] < kill[:, None, :])
        pad = torch.arange(width)[None, :] >= torch.tensor(counts)[:, None]  # [n, width]
        allowed &= ~pad[:, :, None]
        masks = self._window_masks(allowed, q[:, :, None], k[:, None, :])
        if pad.any():  # a padding query sees only its own slot (finite, and never seen itself)
            slot = torch.tensor(offsets)[:, None] + torch.arange(width)[None, :]
            own = (pad[:, :, None] & (torch.arange(key_len)[None, None, :] == slot[:, :, None]))[:, None]
            masks = {w: m | own for w, m in masks.items()} if isinstance(masks, dict) else masks | own
        if isinstance(masks, dict):
            masks = {w: m.to(self.device) for w, m in masks.items()}
        else:
            masks = masks.to(self.device)
        out = self._forward(
            input_ids=ids.to(self.device),
            position_ids=q.to(self.device),
            attention_mask=masks,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else keep.to(self.device),
        )
        self.cache.commit()
        if all_logits:
            return out.logits.float()
        pick = torch.searchsorted(keep, last).to(self.device)
        return out.logits[torch.arange(n, device=self.device), pick].float()
