"""The Stage-2 mask as a flex_attention BlockMask, for long sequences on GPU.

A dense `(B, 1, L, L)` mask costs `B * L^2` bytes (1 GiB per sample at 32K tokens) and forces the
non-fused sdpa path; the BlockMask is built from the O(L) kill-time vector with the same rule,
`allowed(q, k) = k <= q < kill[b, k]` (block-masking spec §7.2), and lets whole blocks be skipped.
"""

from __future__ import annotations

import torch


def flex_available() -> tuple[bool, str]:
    """Whether flex_attention can be used here, and why not when it cannot."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        return False, f"torch {torch.__version__} has no flex_attention ({exc})"
    return True, ""


def block_mask_from_kill_times(kill: torch.Tensor, *, block_size: int = 128):
    """`(B, L)` kill times (see `collator.padded_kill_times`) -> BlockMask of shape `(B, 1, L, L)`.

    Built on `kill.device`; the padding convention of the collator carries over unchanged (a padded
    query sees only itself)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if kill.ndim != 2:
        raise ValueError(f"kill times must be (batch, length), got shape {tuple(kill.shape)}")
    batch, length = kill.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < kill[b, kv_idx])

    return create_block_mask(mask_mod, batch, None, length, length, device=kill.device, BLOCK_SIZE=block_size)
