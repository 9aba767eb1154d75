"""Model forwards over the batched cache, with explicit position ids and a 4D boolean mask.

Positions are always the original logical ones (never inferred from the cache length, which
shrinks on eviction); the mask says which cached slots each query may see, so the model's own
causal-mask logic is bypassed entirely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memento.engine.cache import BatchedKVCache

ATTENTION_NAME = "memento_sdpa"


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA with a mask *and* grouped KV heads: transformers' own path repeats the KV heads whenever
    a mask is given (a full copy of the cache per layer per step); SDPA can broadcast them instead."""
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _sdpa_gqa)
        return True
    except Exception:  # an older/newer transformers without the registry: keep its own sdpa
        return False


class ModelRunner:
    """Runs an HF causal LM one step at a time against a `BatchedKVCache`."""

    def __init__(self, model, cache: BatchedKVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        # SDPA takes a boolean mask as is; other kernels need an additive float mask.
        self.bool_mask = impl == "sdpa"
        self.dtype = cache.dtype
        # While the engine runs the model, sdpa layers use the GQA-aware variant (same math).
        self.attention = ATTENTION_NAME if impl == "sdpa" and _register_attention() else None

    def _forward(self, **kwargs):
        config = self.model.config
        if self.attention is None:
            return self.model(**kwargs)
        saved = config._attn_implementation
        config._attn_implementation = self.attention
        try:
            return self.model(**kwargs)
        finally:
            config._attn_implementation = saved

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.bool_mask:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each row `0..n-1`, appended at each row's end; returns `[n, V]` logits."""
        n = len(token_ids)
        lengths = torch.tensor(self.cache.lengths[:n], device=self.device)
        key_len = self.cache.plan_decode(n)
        allowed = torch.arange(key_len, device=self.device) <= lengths[:, None]
        out = self._forward(
            input_ids=torch.tensor(token_ids, device=self.device)[:, None],
            position_ids=torch.tensor(positions, device=self.device)[:, None],
            attention_mask=self._mask(allowed[:, None, None, :]),
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
        count = len(token_ids)
        self.cache.plan_extend(row, count)
        q = torch.tensor(positions, device=self.device)[:, None]
        k = torch.tensor(key_positions, device=self.device)[None, :]
        allowed = k <= q
        if kill:
            kill_t = torch.full((len(key_positions),), torch.iinfo(torch.long).max, dtype=torch.long)
            index = {p: i for i, p in enumerate(key_positions)}
            for pos, t in kill.items():
                if pos in index:
                    kill_t[index[pos]] = t
            allowed &= q < kill_t.to(self.device)[None, :]
        out = self._forward(
            input_ids=torch.tensor(token_ids, device=self.device)[None, :],
            position_ids=q.T,
            attention_mask=self._mask(allowed[None, None]),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        self.cache.commit()
        return out.logits[0].float() if all_logits else out.logits[0, -1].float()
