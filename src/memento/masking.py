"""Block semantics: the single source of truth for what MEMENTO evicts, and when.

Everything else derives from `BlockTracker`: the engine evicts what it returns, the Stage-2
training mask and the flex_attention form come from its kill times, and KV accounting
(`memento.kv`) counts what it removed. The rule: query `q` may attend to key `k` iff `k <= q` and
`k` is not in a span whose eviction was triggered at a position `<= q`; on a sliding-window layer
(window `W`) also `q - k < W` in original positions (`in_window`).
Spec: shared/reference/block-masking.md.
"""

from __future__ import annotations

import bisect
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from memento.tokens import MarkerIds


@dataclass(frozen=True)
class BlockMaskingConfig:
    """How completed blocks are evicted.

    keep_last_n_blocks: -1 never evicts (vanilla attention, tracking only); 0 evicts each block at
        its `<|summary_end|>`; N > 0 keeps the N most recently completed blocks.
    mask_delimiters: also evict the `<|block_start|>`/`<|block_end|>` tokens (must match training).
    keep_last_block_for_answer: with keep 0, postpone each eviction to the next `<|block_start|>`,
        so the final block stays visible to the answer (inference-only deviation from training).
    require_assistant_section: track markers only after the first `<|im_start|>assistant` header.
    restart_mode: ablation; evict the block with its delimiters, then recompute the memento's KV
        without the block (see `Eviction.recompute_from`).
    restart_kv_only: with restart_mode, the fair ablation of the KV channel: evict exactly what
        memento mode evicts (delimiters per mask_delimiters) and recompute every kept token after
        the evicted span (`<|block_end|>`, the gap, the memento), so the text the model sees is the
        same as in memento mode and no kept KV entry was computed while the block was visible.
    max_block_tokens: > 0 forces `<|block_end|>` once a block holds this many tokens.
    compact_on_summary_end: False disables every automatic eviction (blocks are still tracked).
    """

    keep_last_n_blocks: int = 0
    mask_delimiters: bool = False
    keep_last_block_for_answer: bool = False
    require_assistant_section: bool = True
    restart_mode: bool = False
    max_block_tokens: int = 0
    compact_on_summary_end: bool = True
    restart_kv_only: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = int if f.type in ("int", int) else bool
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"BlockMaskingConfig.{f.name} must be an int, got {value!r}")
            if expected is bool and not isinstance(value, bool):
                raise ValueError(f"BlockMaskingConfig.{f.name} must be true or false, got {value!r}")
        if self.keep_last_n_blocks < -1:
            raise ValueError(
                f"keep_last_n_blocks must be -1 (never evict), 0, or a positive count; got {self.keep_last_n_blocks}"
            )
        if self.max_block_tokens < 0:
            raise ValueError(
                f"max_block_tokens must be >= 0 (0 disables the cap); got {self.max_block_tokens}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> BlockMaskingConfig:
        """Build from a dict; unknown keys are errors (a typo must not silently change semantics)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown block-masking option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**values)

    @classmethod
    def full(cls) -> BlockMaskingConfig:
        """Vanilla attention: blocks are tracked but never evicted."""
        return cls(keep_last_n_blocks=-1)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def evicts(self) -> bool:
        return self.keep_last_n_blocks >= 0 and self.compact_on_summary_end


#: Generation modes: `full` attention (blocks tracked, never evicted), `memento` (evict), `restart`
#: (the ablation that recomputes each memento's KV without its block).
MODES = ("full", "memento", "restart")


def config_for_mode(mode: str, masking: BlockMaskingConfig | None = None) -> BlockMaskingConfig:
    """The masking config a generation mode runs under; the one place a mode gets its meaning.

    `full` never evicts (tracking only), `memento` uses `masking` as given (default keep 0),
    `restart` turns on restart_mode (with `restart_kv_only` from `masking`: the fair variant). Used by the engine, eval's offline replay, `memento kv` and
    the vLLM validation, so a mode means the same everywhere."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config = masking or BlockMaskingConfig()
    if mode == "full":
        return replace(config, keep_last_n_blocks=-1, restart_mode=False, restart_kv_only=False)
    if mode == "restart":
        return replace(config, restart_mode=True)
    for flag in ("restart_mode", "restart_kv_only"):
        if getattr(config, flag):
            raise ValueError(f"masking.{flag}=True needs mode='restart'")
    return config


@dataclass(frozen=True)
class Eviction:
    """A half-open logical span `[start, end)` removed before the forward pass of `trigger`.

    In restart mode `recompute_from` is the `<|summary_start|>` position of the evicted block
    (with `restart_kv_only`: the end of the evicted span): after the removal every position in
    `[recompute_from, trigger]` is computed again, at its original position, attending only to
    what is still cached before `recompute_from`.
    """

    trigger: int
    start: int
    end: int
    recompute_from: int | None = None

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class TrackedBlock:
    """Marker positions of one block (None until seen)."""

    bs: int
    be: int | None = None
    ss: int | None = None
    se: int | None = None

    @property
    def complete(self) -> bool:
        return self.be is not None and self.se is not None


@dataclass
class SpanSet:
    """Sorted, merged, disjoint half-open spans of evicted logical positions."""

    spans: list[tuple[int, int]] = field(default_factory=list)

    def add(self, start: int, end: int) -> int:
        """Merge `[start, end)` in; returns how many positions were newly removed."""
        if end <= start:
            return 0
        before = self.removed
        merged: list[tuple[int, int]] = []
        for s, e in self.spans:
            if e < start or s > end:
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        merged.append((start, end))
        merged.sort()
        self.spans = merged
        return self.removed - before

    @property
    def removed(self) -> int:
        return sum(e - s for s, e in self.spans)

    def __contains__(self, position: int) -> bool:
        i = bisect.bisect_right(self.spans, (position, float("inf"))) - 1
        return i >= 0 and self.spans[i][0] <= position < self.spans[i][1]

    def logical_to_physical(self, position: int) -> int:
        """Slot of a retained logical position once the spans are compacted away."""
        return position - sum(min(e, position) - s for s, e in self.spans if s < position)


class BlockTracker:
    """Incremental block state machine for one sequence: feed tokens, get the evictions they trigger.

    Prompt and generated tokens are fed the same way; an eviction triggered by a prompt token
    applies from that prompt position on (as in Stage-2 training), which makes a continued
    generation identical to an uninterrupted one.
    """

    def __init__(self, markers: MarkerIds, config: BlockMaskingConfig | None = None) -> None:
        self.markers = markers
        self.config = config or BlockMaskingConfig()
        self.position = 0
        self.blocks: list[TrackedBlock] = []
        self.evictions: list[Eviction] = []
        self.evicted = SpanSet()
        self._open: list[int] = []  # ids of blocks that saw BS but not BE (innermost last)
        self._summary_owner: int | None = None
        self._pending: deque[int] = deque()  # completed, not yet evicted, in completion order
        self._gate_open = not self.config.require_assistant_section
        self._last_im: int | None = None
        if not self._gate_open and (markers.im_start is None or markers.assistant is None):
            warnings.warn(
                "require_assistant_section is on but '<|im_start|>' or 'assistant' is not a single "
                "token in this tokenizer: nothing would ever be evicted; tracking every token instead",
                stacklevel=2,
            )
            self._gate_open = True

    @property
    def gate_open(self) -> bool:
        """Whether marker tokens are being tracked (the assistant section has started)."""
        return self._gate_open

    @property
    def removed(self) -> int:
        """Number of distinct logical positions evicted so far."""
        return self.evicted.removed

    @property
    def in_block(self) -> bool:
        return bool(self._open)

    def feed(self, token_id: int) -> list[Eviction]:
        """Process the token at position `self.position`; return the evictions it triggers."""
        p = self.position
        self.position += 1
        m = self.markers
        if not self._gate_open:
            if token_id == m.im_start:
                self._last_im = p
            elif token_id == m.assistant and self._last_im is not None and p - self._last_im <= 2:
                self._gate_open = True
            return []

        out: list[Eviction] = []
        cfg = self.config
        if token_id == m.block_start:
            if cfg.keep_last_block_for_answer and cfg.keep_last_n_blocks == 0 and cfg.compact_on_summary_end:
                while self._pending:
                    self._evict(self._pending.popleft(), p, out)
            self.blocks.append(TrackedBlock(bs=p))
            self._open.append(len(self.blocks) - 1)
        elif token_id == m.block_end:
            if self._open:
                self.blocks[self._open.pop()].be = p
        elif token_id == m.summary_start:
            for block_id in range(len(self.blocks) - 1, -1, -1):
                block = self.blocks[block_id]
                if block.be is not None and block.ss is None:
                    block.ss = p
                    self._summary_owner = block_id
                    break
        elif token_id == m.summary_end and self._summary_owner is not None:
            owner, self._summary_owner = self._summary_owner, None
            self.blocks[owner].se = p
            self._pending.append(owner)
            deferred = cfg.keep_last_block_for_answer and cfg.keep_last_n_blocks == 0
            if cfg.evicts and not deferred:
                while len(self._pending) > cfg.keep_last_n_blocks:
                    self._evict(self._pending.popleft(), p, out)
        self.evictions.extend(out)
        return out

    def feed_all(self, token_ids: Iterable[int]) -> list[Eviction]:
        out: list[Eviction] = []
        for t in token_ids:
            out.extend(self.feed(int(t)))
        return out

    def _evict(self, block_id: int, trigger: int, out: list[Eviction]) -> None:
        block = self.blocks[block_id]
        assert block.be is not None and block.ss is not None
        cfg = self.config
        whole = cfg.mask_delimiters or (cfg.restart_mode and not cfg.restart_kv_only)
        start, end = (block.bs, block.be + 1) if whole else (block.bs + 1, block.be)
        if end <= start:  # an empty block with its delimiters kept: nothing to remove
            return
        self.evicted.add(start, end)
        recompute = None
        if cfg.restart_mode:
            recompute = end if cfg.restart_kv_only else block.ss
        out.append(Eviction(trigger, start, end, recompute))


def _as_list(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        return [int(t) for t in token_ids.reshape(-1).tolist()]
    return [int(t) for t in token_ids]


def evictions(
    token_ids: Sequence[int], markers: MarkerIds, config: BlockMaskingConfig | None = None
) -> list[Eviction]:
    """All evictions over a whole sequence (prompt then generation), in trigger order."""
    tracker = BlockTracker(markers, config)
    return tracker.feed_all(_as_list(token_ids))


def in_window(query_positions, key_positions, window: int | None):
    """The sliding-window half of the rule, the one definition every path uses (Stage-2 training
    mask per layer type, the engine, KV accounting): on a layer with window `W`, query `q` sees
    key `k` only if `q - k < W`, in *original* positions (the window the model was pretrained
    with), never "the last W cached entries" (after eviction those reach further back). `window`
    None means a full-attention layer (always True). Works on ints and on broadcastable tensors;
    combine it with the block rule (`mask_from_kill_times`) by logical and."""
    if window is None:
        return True
    if window < 1:
        raise ValueError(f"a sliding window must be >= 1 token, got {window}")
    return query_positions - key_positions < window


def kill_times(
    token_ids: Sequence[int], markers: MarkerIds, config: BlockMaskingConfig | None = None
) -> torch.LongTensor:
    """Compact per-key form: `kill[k]` is the first query position that may not see key `k`
    (`len(token_ids)` if none). `allowed(q, k) = k <= q < kill[k]`; usable as a flex_attention
    `mask_mod` without materialising an `[L, L]` mask."""
    config = config or BlockMaskingConfig()
    if config.restart_mode:
        raise ValueError("restart mode recomputes KV in a second pass and has no single attention mask")
    ids = _as_list(token_ids)
    kill = torch.full((len(ids),), len(ids), dtype=torch.long)
    for ev in evictions(ids, markers, config):
        span = kill[ev.start : ev.end]
        torch.minimum(span, torch.tensor(ev.trigger), out=span)
    return kill


def attention_mask(
    token_ids: Sequence[int],
    markers: MarkerIds,
    config: BlockMaskingConfig | None = None,
    window: int | None = None,
) -> torch.BoolTensor:
    """Dense `[L, L]` Stage-2 mask, True = query (row) may attend to key (column); with `window`,
    the mask of a sliding-window layer (`in_window`)."""
    kill = kill_times(token_ids, markers, config)
    return mask_from_kill_times(kill, window=window)


@dataclass(frozen=True)
class VirtualSequence:
    """Any masking mode, restart included, as one dense attention pattern over *entries*.

    Restart recomputes KV in a second pass, so no single `[L, L]` mask describes it; but every
    recomputed token can appear again as a second entry (same token, same position id) that sees
    only what was cached before its `recompute_from`, and later tokens attend to the copy instead
    of the original. One forward over the entries then gives exactly what the engine computes.
    Without restart the entries are the positions themselves and `visible` is the Stage-2 mask.

    positions[e]: logical position of entry e (its token is `token_ids[positions[e]]`).
    visible[q, k]: entry q may attend to entry k.
    first[p]: the entry computed when position p was consumed (its logits sample position p+1).
    last[p]: the entry holding the KV that tokens after p read (differs from `first` where recomputed).
    """

    positions: list[int]
    visible: torch.BoolTensor
    first: list[int]
    last: list[int]

    def __len__(self) -> int:
        return len(self.positions)


def virtual_sequence(
    token_ids: Sequence[int], markers: MarkerIds, config: BlockMaskingConfig | None = None
) -> VirtualSequence:
    """The entries and dense mask of one sequence under `config` (see `VirtualSequence`)."""
    config = config or BlockMaskingConfig()
    ids = _as_list(token_ids)
    if not config.restart_mode:
        identity = list(range(len(ids)))
        return VirtualSequence(identity, attention_mask(ids, markers, config), identity, list(identity))
    tracker = BlockTracker(markers, config)
    positions: list[int] = []
    rows: list[list[int]] = []  # visible entries of each entry (itself included)
    live: list[int] = []  # entries currently cached, in cache order
    first: list[int] = []
    last: list[int] = []

    def add(p: int) -> None:
        e = len(positions)
        positions.append(p)
        rows.append([*live, e])
        live.append(e)
        if p == len(first):
            first.append(e)
            last.append(e)
        else:
            last[p] = e

    for p, t in enumerate(ids):
        evs = tracker.feed(t)
        for ev in evs:  # evictions sharing a trigger apply together, then one recompute
            live[:] = [e for e in live if not ev.start <= positions[e] < ev.end]
        starts = [ev.recompute_from for ev in evs if ev.recompute_from is not None]
        if starts:
            redo = [positions[e] for e in live if positions[e] >= min(starts)]
            live[:] = [e for e in live if positions[e] < min(starts)]
            for q in redo:
                add(q)
        add(p)
    visible = torch.zeros(len(positions), len(positions), dtype=torch.bool)
    for e, keys in enumerate(rows):
        visible[e, keys] = True
    return VirtualSequence(positions, visible, first, last)


def mask_from_kill_times(
    kill: torch.Tensor, query_positions: torch.Tensor | None = None, window: int | None = None
) -> torch.BoolTensor:
    """Rows for `query_positions` (default all) of the mask defined by per-key kill times `[..., L]`
    (a batch `[B, L]` gives `[B, Q, L]`): `k <= q < kill[k]`, and `q - k < window` if given."""
    keys = torch.arange(kill.shape[-1], device=kill.device)
    q = keys if query_positions is None else query_positions.to(kill.device)
    q = q.unsqueeze(-1)
    allowed = (keys <= q) & (q < kill.unsqueeze(-2))
    if window is not None:
        allowed &= in_window(q, keys, window)
    return allowed


class BlockLengthCap:
    """Forces `<|block_end|>` once an open block holds `max_block_tokens` content tokens.

    Independent of the tracker and its gate (as in the original): `<|block_start|>` starts a count,
    `<|block_end|>` ends it, the four markers are not counted.
    """

    def __init__(self, markers: MarkerIds, max_block_tokens: int) -> None:
        self.markers = markers
        self.max_block_tokens = max_block_tokens
        self.in_block = False
        self.count = 0
        self._markers = set(markers.block_markers)

    def feed(self, token_id: int) -> None:
        if token_id == self.markers.block_start:
            self.in_block, self.count = True, 0
        elif token_id == self.markers.block_end:
            self.in_block, self.count = False, 0
        elif self.in_block and token_id not in self._markers:
            self.count += 1

    @property
    def must_close(self) -> bool:
        """True when the next token must be `<|block_end|>`."""
        return self.max_block_tokens > 0 and self.in_block and self.count >= self.max_block_tokens


def __getattr__(name: str):
    """`kv_occupancy`, `kv_stats` and `KVStats` are part of the stable API under this module's name
    (ARCHITECTURE.md); they live in `memento.kv`, the one home of KV counting."""
    if name in ("kv_occupancy", "kv_stats", "KVStats"):
        from memento import kv

        return getattr(kv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
