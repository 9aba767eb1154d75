"""Continuous batching under a KV-token budget.

Requests wait in arrival order; one joins the running batch when its prefill (peak and what stays
cached) fits in the budget next to the running ones. Each decode step adds one cached token per
running request; when that would overflow the budget, the youngest running request is preempted
and put back at the front of the queue, to be resumed later by recomputation (its tokens and block
tracker are kept, so evicted blocks stay evicted). Eviction frees budget the moment it happens —
this is where MEMENTO's throughput gain comes from: more requests fit at once.
"""

from __future__ import annotations

from collections import deque

from memento.engine.sequence import Plan, Sequence


class BudgetError(RuntimeError):
    """A single request cannot fit in `kv_budget_tokens` even when running alone (`seq`: which)."""

    def __init__(self, message: str, seq: Sequence | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class Scheduler:
    """Decides who runs; the engine executes (prefill, decode, preemption)."""

    def __init__(self, kv_budget_tokens: int | None, max_batch_size: int, prefill_chunk_tokens: int) -> None:
        if kv_budget_tokens is not None and kv_budget_tokens < 2:
            raise ValueError(f"kv_budget_tokens must be >= 2 (or None for no limit), got {kv_budget_tokens}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.budget = kv_budget_tokens
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def used(self) -> int:
        """Cached tokens over the running requests."""
        return sum(s.cached for s in self.running)

    def check_fits(self, seq: Sequence) -> None:
        """Raise `BudgetError` if `seq` could not be admitted even with nothing else running."""
        if self.budget is None:
            return
        plan = seq.plan(self.prefill_chunk_tokens)
        need = max(plan.peak, plan.final + 1)
        if need > self.budget:
            raise BudgetError(
                f"request {seq.prompt_index} (sample {seq.sample}) needs {need} KV tokens but "
                f"kv_budget_tokens={self.budget}; raise the budget or shorten the prompt",
                seq,
            )

    def admit(self) -> list[tuple[Sequence, Plan]]:
        """Waiting requests that may join now (in order), each with the plan that prefills it."""
        admitted: list[tuple[Sequence, Plan]] = []
        used = self.used()
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            plan = seq.plan(self.prefill_chunk_tokens)
            if self.budget is not None:
                # its prefill must fit, and then the next step's growth of everyone (itself included)
                grow = len(self.running) + 1
                if used + plan.peak > self.budget or used + plan.final + grow > self.budget:
                    if not self.running:
                        self.check_fits(seq)
                    break
            self.waiting.popleft()
            self.running.append(seq)
            admitted.append((seq, plan))
            used += plan.final
        return admitted

    def preempt_for_growth(self) -> tuple[list[Sequence], Sequence | None]:
        """Running requests to preempt so that the next decode step (one new cached token per
        running request) stays within the budget, youngest (latest arrival) first; and the one
        request left, if even alone it has no room for another token (the engine decides)."""
        victims: list[Sequence] = []
        if self.budget is None:
            return victims, None
        used = self.used()
        overflow = None
        while self.running and used + len(self.running) > self.budget:
            if len(self.running) == 1:
                overflow = self.running[0]
                break
            victim = max(self.running, key=lambda s: s.request_id)
            self.running.remove(victim)
            used -= victim.cached
            victims.append(victim)
            self.num_preemptions += 1
        for victim in victims:  # the oldest victim ends up first in line
            self.waiting.appendleft(victim)
        return victims, overflow

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
