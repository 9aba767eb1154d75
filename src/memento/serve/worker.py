"""The engine thread: the one place the engine (and its tokenizer) is touched.

The asyncio front end hands it jobs and cancellations through an inbox; between two engine steps
the thread adds new requests, drops cancelled ones (their KV is freed before the next step), then
runs one step and sends every job the deltas of its choices through the job's asyncio queue. It
also keeps the KV history the dashboard draws and feeds the Prometheus histograms.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from memento.engine import Engine
from memento.engine.scheduler import BudgetError
from memento.engine.sequence import Sequence
from memento.serve.metrics import Metrics
from memento.serve.output import Delta
from memento.serve.prompts import Choice
from memento.serve.protocol import APIError

log = logging.getLogger("memento.serve")

IDLE_SAMPLE_SECONDS = 0.5  # while idle, one dashboard sample this often (the chart keeps moving)
SAMPLE_SECONDS = 0.02  # while busy, at most one sample this often (4096 samples = 80 s of history)


class Job:
    """One HTTP request on its way through the engine. `prepare(engine)` runs on the engine thread
    and returns (choices, mode, masking); results arrive on `queue` as ("accepted", None),
    ("error", APIError), ("deltas", [(choice index, Delta)]) and ("done", [per-choice stats])."""

    _ids = itertools.count()

    def __init__(
        self, prepare: Callable[[Engine], tuple[list[Choice], Any, Any]], stream: bool = False
    ) -> None:
        self.id = next(self._ids)
        self.prepare = prepare
        self.stream = stream  # only streaming jobs get "deltas" messages
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.choices: list[Choice] = []
        self.first_token_at: float | None = None
        self.closed = False

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class EngineWorker:
    """Owns the engine; `load` builds it on the worker thread (so /health can answer while loading)."""

    def __init__(
        self,
        load: Callable[[], Engine],
        *,
        history: int = 4096,
        on_dead: Callable[[str], None] | None = None,
    ) -> None:
        self._load = load
        self.on_dead = on_dead
        self.state = "loading"  # -> "ready" -> "dead" (load failure or engine error) | "stopped"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.metrics = Metrics(self.snapshot)
        self._inbox: deque[tuple[str, Job]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._owners: dict[int, tuple[Job, Choice]] = {}  # engine request id -> its job and choice
        self._jobs: dict[int, Job] = {}
        self.samples: deque[dict] = deque(maxlen=history)
        self._sample_no = 0
        self._last_sample_at = 0.0
        self.generated = 0
        self.finished_choices = 0
        self.started_at = time.time()
        self._latest = self._empty_snapshot()
        self.thread = threading.Thread(target=self._main, name="memento-engine", daemon=True)

    # --- the asyncio side ---------------------------------------------------------------------

    def start(self) -> None:
        if not self.thread.is_alive() and self.state == "loading":
            self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._inbox.append(("add", job))
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job's sequences before the next step."""
        self._inbox.append(("abort", job))
        self._wake.set()

    def snapshot(self) -> dict:
        """The latest sample (running sequences' KV, waiting, totals); safe from any thread."""
        return self._latest

    def samples_since(self, index: int, limit: int = 2000) -> list[dict]:
        items = list(self.samples)
        return [s for s in items if s["i"] > index][-limit:]

    # --- the engine thread --------------------------------------------------------------------

    def _empty_snapshot(self) -> dict:
        return {
            "i": 0, "t": time.time(), "kv": 0, "running": {}, "waiting": 0, "gen": 0, "ev": 0, "pre": 0,
            "steps": 0, "done": 0, "peak": 0, "budget": None,
        }  # fmt: skip

    def _main(self) -> None:
        try:
            engine = self._load()
            engine.cut_at_budget = True
        except BaseException as exc:  # noqa: BLE001 - any load failure ends this server
            self._die(f"the model failed to load: {type(exc).__name__}: {exc}", None)
            return
        self.engine = engine
        self._record()
        self.state = "ready"
        busy = False
        while not self._stop:
            self._wake.clear()
            try:
                self._drain()
                if not engine.has_work:
                    if busy or time.perf_counter() - self._last_sample_at >= IDLE_SAMPLE_SECONDS:
                        self._record()  # the idle state at once, then now and then
                    busy = False
                    self._wake.wait(IDLE_SAMPLE_SECONDS)
                    continue
                busy = True
                changed = engine.step()
                self._dispatch(changed)
                if time.perf_counter() - self._last_sample_at >= SAMPLE_SECONDS:
                    self._record()
            except BaseException as exc:  # noqa: BLE001 - the engine is in an unknown state now
                self._die(f"the engine failed: {type(exc).__name__}: {exc}", exc)
                return
        self.state = "stopped"

    def _die(self, message: str, exc: BaseException | None) -> None:
        details = "" if exc is None else "\n" + "".join(traceback.format_exception(exc))
        log.error("%s%s", message, details)
        self.error = message
        self.state = "dead"
        error = APIError(500, message, kind="server_error", code="engine_dead")
        for job in list(self._jobs.values()):
            job.post("error", error)
        self._jobs.clear()
        self._owners.clear()
        if self.on_dead is not None:
            self.on_dead(message)

    def _drain(self) -> None:
        while self._inbox:
            kind, job = self._inbox.popleft()
            if kind == "add":
                self._add(job)
            else:
                self._abort(job)

    def _add(self, job: Job) -> None:
        engine = self.engine
        if job.closed:  # cancelled before it was added
            return
        try:
            choices, mode, masking = job.prepare(engine)
        except APIError as exc:
            job.post("error", exc)
            return
        added: list[Sequence] = []
        try:
            for c in choices:
                c.seq = engine.add_request(
                    c.prompt_ids,
                    c.params,
                    prompt_index=c.prompt_index,
                    sample=c.sample,
                    mode=mode,
                    masking=masking,
                )
                added.append(c.seq)
        except (BudgetError, ValueError) as exc:
            for seq in added:
                engine.abort(seq)
            where = "messages" if choices and choices[0].output.split else "prompt"
            if isinstance(exc, BudgetError):
                message = (
                    f"the prompt does not fit in the server's KV budget of {engine.kv_budget_tokens} tokens "
                    f"(--kv-budget-tokens): {exc}"
                )
                job.post("error", APIError(400, message, param=where, code="kv_budget_exceeded"))
            else:
                job.post("error", APIError(400, str(exc), param="memento"))
            return
        job.choices = choices
        self._jobs[job.id] = job
        for c in choices:
            self._owners[c.seq.request_id] = (job, c)
        self.metrics.prompt_tokens.inc(
            sum(len(ids) for ids in {c.prompt_index: c.prompt_ids for c in choices}.values())
        )
        job.post("accepted")

    def _abort(self, job: Job) -> None:
        job.closed = True
        for c in job.choices:
            self.engine.abort(c.seq)
            c.output.abort()
            self._owners.pop(c.seq.request_id, None)
        self._jobs.pop(job.id, None)

    def _dispatch(self, changed: list[Sequence]) -> None:
        now = time.perf_counter()
        deltas: dict[int, list[tuple[int, Delta]]] = {}
        for seq in changed:
            owner = self._owners.get(seq.request_id)
            if owner is None:
                continue
            job, c = owner
            delta = self._advance(c, seq, now)
            if delta.stop_now and seq.finish_reason is None:
                self.engine.abort(seq)  # a stop string matched: free its KV now
            if delta.token_ids or delta.finish_reason:
                deltas.setdefault(job.id, []).append((c.index, delta))
            if job.first_token_at is None and delta.token_ids:
                job.first_token_at = now
                self.metrics.ttft.observe(now - job.arrival)
        for job_id, items in deltas.items():
            job = self._jobs[job_id]
            if job.stream:
                job.post("deltas", items)
            if all(c.output.finished for c in job.choices):
                self._close(job, now)

    def _advance(self, c: Choice, seq: Sequence, now: float) -> Delta:
        """Feed the choice the tokens its sequence produced since the last step (one, or none when
        the engine cut it at the KV budget)."""
        n_out = len(seq.tokens) - seq.prompt_len
        delta = Delta()
        while c.seen < n_out and not c.output.finished:
            j = c.seen
            c.seen += 1
            last = c.seen == n_out
            logprob = seq.logprobs[j] if c.params.logprobs else None
            top = seq.top_logprobs[j] if c.params.top_logprobs else None
            finish = seq.finish_reason if last and seq.finish_reason != "abort" else None
            piece = c.output.feed(seq.tokens[seq.prompt_len + j], logprob, top, finish)
            _merge(delta, piece)
            self.generated += 1
            self.metrics.generation_tokens.inc()
            if c.last_token_at is not None:
                self.metrics.itl.observe(now - c.last_token_at)
            c.last_token_at = now
        if not c.output.finished and seq.finish_reason in ("stop", "length"):
            _merge(delta, c.output.close(seq.finish_reason))
        if delta.finish_reason is not None:
            self.finished_choices += 1
            self.metrics.finished.labels(delta.finish_reason).inc()
            c.stats = {
                "peak_kv": max(seq.kv_trace, default=0),
                "evictions": len(seq.tracker.evictions),
                "preemptions": seq.num_preemptions,
            }
        return delta

    def _close(self, job: Job, now: float) -> None:
        self.metrics.e2e.observe(now - job.arrival)
        for c in job.choices:
            self._owners.pop(c.seq.request_id, None)
        self._jobs.pop(job.id, None)
        job.post("done", [c.stats for c in job.choices])

    def _record(self) -> None:
        """One dashboard/metrics sample: KV per running sequence and in total, queue, counters."""
        engine = self.engine
        now = time.perf_counter()
        self._sample_no += 1
        self._last_sample_at = now
        sample = {
            "i": self._sample_no,
            "t": time.time(),
            "kv": engine.cache.total_tokens(),
            "running": {str(s.request_id): s.cached for s in engine.scheduler.running},
            "waiting": len(engine.scheduler.waiting),
            "gen": self.generated,
            "ev": engine.num_evictions,
            "pre": engine.scheduler.num_preemptions,
            "steps": engine.num_steps,
            "done": self.finished_choices,
            "peak": engine.peak_total_kv,
            "budget": engine.kv_budget_tokens,
        }
        self.samples.append(sample)
        self._latest = sample


def _merge(into: Delta, piece: Delta) -> None:
    into.reasoning += piece.reasoning
    into.content += piece.content
    into.token_ids += piece.token_ids
    into.logprobs += piece.logprobs
    if piece.finish_reason is not None:
        into.finish_reason = piece.finish_reason
        into.stop_reason = piece.stop_reason
        into.stop_now = into.stop_now or piece.stop_now
