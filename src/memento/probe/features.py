"""KV features at memento positions, under any block semantics, from one dense forward per batch.

Every semantics is a `memento.masking.VirtualSequence` (entries, each a token at its original
position, and which entries each may see): the Stage-2 mask, full attention, restart (the memento's
KV recomputed without its block) and, for patching, entries spliced in from another problem. The
forward's KV cache then holds exactly the keys and values the engine would have cached.

Keys are taken **after RoPE** (what the cache holds and later queries read). Within one probe set
every memento sits at the same position in every problem, so post-RoPE keys are a fixed rotation of
the pre-RoPE ones, position by position, and a probe cannot tell the difference. A memento's
features at one layer are its tokens (`<|summary_start|>` and the memento text, the
tokens computed while the block was visible) side by side (`pooled(..., "concat")`; `"mean"`
averages them instead), each token's keys and values with all KV heads concatenated:
`tokens * 2 * kv_heads * head_dim` numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memento.hf import cache_kv, with_cache
from memento.masking import BlockMaskingConfig, BlockTracker, VirtualSequence, virtual_sequence
from memento.tokens import MarkerIds

SEMANTICS: dict[str, BlockMaskingConfig] = {
    "memento": BlockMaskingConfig(),  # the Stage-2 mask (keep 0, delimiters kept)
    "full": BlockMaskingConfig.full(),  # nothing evicted: later mementos see the block directly
    "restart": BlockMaskingConfig(restart_mode=True),  # today's restart: block and delimiters evicted
    "restart_kv": BlockMaskingConfig(restart_mode=True, restart_kv_only=True),  # only the KV channel removed
}


def memento_spans(token_ids: Sequence[int], markers: MarkerIds) -> list[tuple[int, int]]:
    """`[ss, se)` of every completed block's memento, in block order."""
    tracker = BlockTracker(markers, BlockMaskingConfig.full())
    tracker.feed_all(token_ids)
    return [(b.ss, b.se) for b in tracker.blocks if b.complete]


@dataclass
class Entries:
    """One row of a dense forward: entry tokens, their position ids, and who may see whom."""

    tokens: list[int]
    positions: list[int]
    visible: torch.BoolTensor

    @classmethod
    def of(cls, token_ids: Sequence[int], virtual: VirtualSequence) -> Entries:
        return cls([int(token_ids[p]) for p in virtual.positions], list(virtual.positions), virtual.visible)


@dataclass
class ForwardResult:
    keys: list[torch.Tensor]  # per layer [B, kv_heads, n, head_dim] (post-RoPE)
    values: list[torch.Tensor]
    logits: torch.Tensor | None  # [B, n, vocab] when asked for


@torch.no_grad()
def run_entries(model, rows: list[Entries], logits: bool = False) -> ForwardResult:
    """One forward over right-padded rows of entries; padding entries see only themselves."""
    from transformers import DynamicCache

    n = max(len(r.tokens) for r in rows)
    batch = len(rows)
    ids = torch.zeros(batch, n, dtype=torch.long)
    pos = torch.zeros(batch, n, dtype=torch.long)
    mask = torch.eye(n, dtype=torch.bool).repeat(batch, 1, 1)
    for b, r in enumerate(rows):
        m = len(r.tokens)
        ids[b, :m] = torch.tensor(r.tokens)
        pos[b, :m] = torch.tensor(r.positions)
        pos[b, m:] = torch.arange(m, n)
        mask[b, :m, :m] = r.visible
    device = next(model.parameters()).device
    cache = DynamicCache()
    out = model(
        input_ids=ids.to(device),
        position_ids=pos.to(device),
        attention_mask=mask[:, None].to(device),
        use_cache=True,
        logits_to_keep=0 if logits else 1,
        **with_cache(model, cache),
    )
    keys = [k.float().cpu() for k, _ in cache_kv(cache)]
    values = [v.float().cpu() for _, v in cache_kv(cache)]
    return ForwardResult(keys, values, out.logits.float().cpu() if logits else None)


def memento_kv(
    result: ForwardResult, row: int, spans: list[tuple[int, int]], entry_of: Sequence[int]
) -> torch.Tensor:
    """`[mementos, layers, tokens, 2 * kv_heads * head_dim]`: per memento, layer and memento token,
    its key | value (KV heads concatenated), read at the entries `entry_of[position]`. Every
    memento must have the same number of tokens (true of the probing toy's `sum=NNN`)."""
    lengths = {se - ss for ss, se in spans}
    if len(lengths) != 1:
        raise ValueError(
            f"mementos of different lengths {sorted(lengths)}: per-token features need equal ones"
        )
    out = []
    for ss, se in spans:
        idx = torch.tensor([entry_of[p] for p in range(ss, se)])
        per_layer = [
            torch.cat(
                [k[row][:, idx].transpose(0, 1).flatten(1), v[row][:, idx].transpose(0, 1).flatten(1)], dim=-1
            )
            for k, v in zip(result.keys, result.values, strict=True)
        ]
        out.append(torch.stack(per_layer))
    return torch.stack(out)


def pooled(features: torch.Tensor, pool: str) -> torch.Tensor:
    """Features `[..., tokens, F]` of `extract` as one vector per memento and layer: `concat`
    (the tokens side by side, `tokens * F`) or `mean` (their average, `F`)."""
    if pool == "concat":
        return features.flatten(-2)
    if pool == "mean":
        return features.float().mean(dim=-2)
    raise ValueError(f"pool must be 'concat' or 'mean', got {pool!r}")


@torch.no_grad()
def extract(
    model,
    sequences: Sequence[Sequence[int]],
    markers: MarkerIds,
    semantics: str,
    *,
    batch_size: int = 32,
    progress=None,
) -> torch.Tensor:
    """Memento KV of every sequence under `semantics` (a key of `SEMANTICS`):
    `[sequences, mementos, layers, memento tokens, 2 * kv_heads * head_dim]` (`pooled` turns it
    into one vector per memento and layer). Every sequence must have the same number of blocks.
    The KV is read where later tokens read it (`VirtualSequence.last`: in restart, the recomputed
    copy)."""
    config = SEMANTICS[semantics]
    feats = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        virtual = [virtual_sequence(ids, markers, config) for ids in chunk]
        result = run_entries(model, [Entries.of(ids, v) for ids, v in zip(chunk, virtual, strict=True)])
        for b, (ids, v) in enumerate(zip(chunk, virtual, strict=True)):
            feats.append(memento_kv(result, b, memento_spans(ids, markers), v.last))
        if progress is not None:
            progress(len(chunk))
    counts = {f.shape[0] for f in feats}
    if len(counts) != 1:
        raise ValueError(f"sequences have different numbers of completed blocks: {sorted(counts)}")
    return torch.stack(feats)
