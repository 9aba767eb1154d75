"""Per-request state and the plan that brings its KV cache up to date.

A sequence is "ready" when its last token (position `p`, just sampled or the last prompt token) is
the only one not yet computed, and every eviction triggered at a position `<= p` has been applied:
the cache then holds exactly the logical positions `< p` that the Stage-2 mask lets `p` see. The
same plan reaches that state from anywhere: a new prompt (empty cache), a request resumed after
preemption (empty cache, tokens and tracker kept), or a decode step whose token triggered an
eviction (drop the span; in restart mode also rewind and recompute the memento).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import torch

from memento.engine.sampling import SamplingParams
from memento.masking import BlockLengthCap, BlockMaskingConfig, BlockTracker, Eviction, SpanSet
from memento.tokens import MarkerIds


@dataclass
class RequestOutput:
    """One finished request (one sample of one prompt).

    `logprobs` (with `SamplingParams(logprobs=True)`, and always from `Engine.replay`): one float
    per output token, computed from the logits the engine picked that token from (this mode, this
    masking config, the evictions applied so far):

    * a sampled token: its log-probability under the distribution it was drawn from (temperature,
      top-k, top-p and min-p applied), the behaviour policy an RL update needs;
    * a greedy token (temperature 0), a forced token, and every token of a replay: the model's own
      log-softmax at that token (temperature 1, no filters).

    `forced` (with `SamplingParams(logprobs=True)`; None from replay, whose tokens are all given):
    True for a token the engine chose instead of the model, i.e. the `<|block_end|>` that
    `max_block_tokens` imposes.

    `top_logprobs` (with `SamplingParams(top_logprobs=k)`): per output token, the k most likely
    `(token_id, logprob)` of the same distribution `logprobs` is under (filtered tokens: -inf).
    """

    prompt_index: int
    sample: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    evictions: list[Eviction]
    kv_trace: list[int]  # cached tokens when each output token was sampled
    peak_kv: int
    auc_kv: int
    num_preemptions: int
    seconds: float
    tokens_per_s: float
    seed: int | None = None
    logprobs: list[float] | None = None
    forced: list[bool] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass(frozen=True)
class EvictOp:
    """Drop physical slots `[first, last)`; then, in restart mode, keep only `truncate_to` slots."""

    eviction: Eviction
    first: int
    last: int
    truncate_to: int | None = None


@dataclass(frozen=True)
class ComputeOp:
    """Compute `positions` in one forward. `key_positions` are the logical positions of every key
    the forward sees (cached slots, then the new ones); `kill` maps a key position to the first
    query position that may no longer see it, for evictions that fall inside this chunk."""

    positions: list[int]
    key_positions: list[int]
    kill: dict[int, int]


@dataclass
class Plan:
    ops: list[EvictOp | ComputeOp]
    peak: int  # most cached tokens at any point while executing it
    final: int  # cached tokens when done
    slot_pos: list[int]
    applied: int
    computed: int


@dataclass
class Sequence:
    """Everything the engine knows about one request."""

    request_id: int
    prompt_index: int
    sample: int
    prompt_ids: list[int]
    params: SamplingParams
    markers: MarkerIds
    config: BlockMaskingConfig
    generator: torch.Generator
    seed: int | None = None
    script: list[int] | None = None  # teacher-forced output tokens (replay)
    tokens: list[int] = field(default_factory=list)
    tracker: BlockTracker = field(init=False)
    cap: BlockLengthCap = field(init=False)
    slot_pos: list[int] = field(default_factory=list)  # logical position of each cached slot
    applied: int = 0  # evictions of the tracker already applied to the cache
    computed: int = 0  # every retained position before this one is cached
    row: int | None = None
    kv_trace: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # per output token (when asked for)
    forced: list[bool] = field(default_factory=list)  # per output token (when asked for)
    top_logprobs: list[list[tuple[int, float]]] = field(
        default_factory=list
    )  # per output token (when asked for)
    num_preemptions: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)
        self.tracker = BlockTracker(self.markers, self.config)
        self.tracker.feed_all(self.tokens)
        self.cap = BlockLengthCap(self.markers, self.config.max_block_tokens)
        for t in self.tokens:
            self.cap.feed(t)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def pending_position(self) -> int:
        """Position of the token the next decode step consumes."""
        return len(self.tokens) - 1

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs or self.script is not None

    @property
    def cached(self) -> int:
        return len(self.slot_pos)

    def append(self, token_id: int) -> list[Eviction]:
        """Record a sampled token; returns the evictions it triggers (not applied yet)."""
        self.tokens.append(token_id)
        self.cap.feed(token_id)
        return self.tracker.feed(token_id)

    def reset_cache(self) -> None:
        """Forget the KV cache (preemption): the tokens and the tracker are kept, so recomputing
        reaches exactly the same state."""
        self.slot_pos = []
        self.applied = 0
        self.computed = 0
        self.row = None
        self.num_preemptions += 1

    def plan(self, chunk_tokens: int = 2048) -> Plan:
        """Ops that make the sequence ready (see the module docstring), simulated on bookkeeping
        only, so the scheduler can check the KV budget before anything runs."""
        evs = self.tracker.evictions
        target = self.pending_position
        if self.applied == len(evs) and self.computed >= target:  # the common decode step
            return Plan([], self.cached, self.cached, self.slot_pos, self.applied, self.computed)
        slots = list(self.slot_pos)
        applied = self.applied
        computed = self.computed
        removed = SpanSet()
        for ev in evs[:applied]:
            removed.add(ev.start, ev.end)
        reached = computed
        ops: list[EvictOp | ComputeOp] = []
        peak = len(slots)
        while True:
            while applied < len(evs) and evs[applied].trigger <= reached:
                ev = evs[applied]
                applied += 1
                removed.add(ev.start, ev.end)
                first, last = bisect.bisect_left(slots, ev.start), bisect.bisect_left(slots, ev.end)
                del slots[first:last]
                truncate_to = None
                if ev.recompute_from is not None:
                    truncate_to = bisect.bisect_left(slots, ev.recompute_from)
                    del slots[truncate_to:]
                    computed = min(computed, ev.recompute_from)
                ops.append(EvictOp(ev, first, last, truncate_to))
            if computed >= target:
                break
            end = min(target, computed + max(1, chunk_tokens))
            kill: dict[int, int] = {}
            for ev in evs[applied:]:
                if ev.trigger >= end:
                    break
                if ev.recompute_from is not None:  # restart: stop right before the trigger
                    end = max(ev.trigger, computed + 1)
                    break
                for k in range(ev.start, ev.end):
                    kill[k] = min(kill.get(k, ev.trigger), ev.trigger)
            positions = [q for q in range(computed, end) if q not in removed]
            keys = slots + positions
            ops.append(ComputeOp(positions, keys, {k: t for k, t in kill.items() if t < end}))
            slots = list(keys)
            peak = max(peak, len(slots))
            computed = end
            reached = max(reached, end)
        return Plan(ops, peak, len(slots), slots, applied, computed)
