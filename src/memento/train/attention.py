"""Causal-chunked sdpa for dense Stage-2 masks.

With an explicit mask, sdpa computes every query x key pair, while Stage 1 (no mask) gets the
causal kernel that skips the upper triangle: at 1,024 tokens that is ~1.4x more attention work for
Stage 2. The Stage-2 mask is still causal, so queries `[i, i+C)` never need keys `>= i+C`; splitting
the queries into chunks and giving each only its key prefix removes most of that waste, with
plain sdpa (forward and backward) underneath. Registered with transformers as `memento_sdpa`.
"""

from __future__ import annotations

import torch

NAME = "memento_sdpa"
CHUNK = 256


def chunked_sdpa_forward(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers attention function: sdpa over causal query chunks when given a full square 4D
    mask (training / prefill without cache); plain sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if (
        not isinstance(attention_mask, torch.Tensor)
        or attention_mask.ndim != 4
        or key.shape[2] != length
        or attention_mask.shape[-2] != length
        or length <= CHUNK
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    outs = []
    for start in range(0, length, CHUNK):
        end = min(length, start + CHUNK)
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, :end],
            value[:, :, :end],
            attention_mask[:, :, start:end, :end],
            *args,
            **kwargs,
        )
        outs.append(out)
    return torch.cat(outs, dim=1), None  # sdpa_attention_forward returns (batch, q_len, heads, dim)


def register() -> str:
    """Make `memento_sdpa` available to `attn_implementation=` / `set_attn_implementation` (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, chunked_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
