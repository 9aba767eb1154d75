"""The annotation run: traces in, `records.jsonl` + `traces.jsonl` + stats out, resumable and shardable.

Per trace: split the thinking into sentences → score the boundaries → segment → write a memento per
block. Each finished trace is appended to `records.jsonl` (the source of truth, one JSON line,
flushed and fsynced) and then to `traces.jsonl` (the `MementoTrace` lines `memento train` reads).
On start the runner reads the ids already in `records.jsonl`, drops a truncated last line left by a
kill, and rebuilds `traces.jsonl` from the records, so a killed run continues with nothing lost or
duplicated. A trace whose processing fails (e.g. the compressor is unreachable after retries) is
logged to `errors.jsonl` and not recorded, so the next run retries it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from memento.annotate.llm import LLMClient, LLMConfig
from memento.annotate.mementos import (
    ExtractiveConfig,
    MementoConfig,
    MementoResult,
    block_text,
    compression_ratio,
    extractive_memento,
    llm_mementos,
)
from memento.annotate.scoring import ScoringConfig, fill_missing, heuristic_scores, llm_scores
from memento.annotate.segmentation import SegmentationWarning, objective, segment
from memento.annotate.sentences import SplitConfig, TokenCounter, load_token_counter, split_sentences
from memento.annotate.sources import RawTrace, SourceConfig, SourceReport, iter_traces, no_usable_traces
from memento.format import Block, MementoTrace

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
TRACES = "traces.jsonl"
ERRORS = "errors.jsonl"
BACKENDS = ("heuristic", "openai")


class RunAborted(RuntimeError):
    """Too many traces failed in a row (the endpoint is probably down); the message says why."""


@dataclass(frozen=True)
class AnnotateConfig:
    """Everything that decides what a run produces. Unknown keys are errors (see from_dict)."""

    backend: str = "heuristic"
    min_block_tokens: int = 200
    variance_penalty: float = 0.5
    min_blocks: int = 1
    max_blocks: int | None = None
    limit: int | None = None
    shard_index: int = 0
    shard_count: int = 1
    workers: int = 1
    tokenizer: str | None = None
    max_consecutive_failures: int = 20
    progress: bool = True
    split: SplitConfig = field(default_factory=SplitConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    mementos: MementoConfig = field(default_factory=MementoConfig)
    extractive: ExtractiveConfig = field(default_factory=ExtractiveConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(
                f"shard {self.shard_index}/{self.shard_count}: need 0 <= i < n (e.g. --shard 0/4)"
            )
        for name, value, low in (
            ("workers", self.workers, 1),
            ("min_block_tokens", self.min_block_tokens, 0),
            ("variance_penalty", self.variance_penalty, 0),
            ("max_consecutive_failures", self.max_consecutive_failures, 1),
            ("limit", self.limit, 1),
        ):
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnnotateConfig:
        nested = {
            "split": SplitConfig,
            "scoring": ScoringConfig,
            "mementos": MementoConfig,
            "extractive": ExtractiveConfig,
            "source": SourceConfig,
            "llm": LLMConfig,
        }
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown annotate config keys: {sorted(unknown)}")
        kwargs = dict(d)
        for name, typ in nested.items():
            if name in kwargs and isinstance(kwargs[name], dict):
                sub = kwargs[name]
                bad = set(sub) - {f.name for f in fields(typ)}
                if bad:
                    raise ValueError(f"unknown {name} config keys: {sorted(bad)}")
                kwargs[name] = typ(**sub)
        return cls(**kwargs)

    def public_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["llm"] = {k: v for k, v in d["llm"].items() if k != "api_key"}  # never write secrets
        return d


@dataclass
class RunSummary:
    output_dir: Path
    processed: int
    skipped_done: int
    failed: int
    source: SourceReport
    stats: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# One trace


def offline_record(
    raw: RawTrace, cfg: AnnotateConfig, counter: TokenCounter, on_stage: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The record of one trace with the offline backend (heuristic scores, extractive mementos).

    Plain synchronous code, so Ctrl-C interrupts it at once; `on_stage` hears which step a long
    trace is in (progress for traces that take minutes)."""
    t0 = time.perf_counter()
    stage = on_stage or (lambda text: None)
    stage("splitting sentences")
    sentences = split_sentences(raw.thinking, counter, cfg.split)
    token_counts = [counter.count(s) for s in sentences]
    heur = list(heuristic_scores(sentences))
    stage(f"segmenting {len(sentences):,} sentences")
    blocks, seg_warning = _segment(token_counts, heur, cfg)
    texts = [block_text(sentences, a, b) for a, b in blocks]
    stage(f"writing {len(texts):,} mementos")
    results = [MementoResult(extractive_memento(t, counter, cfg.extractive), None) for t in texts]
    scoring: dict[str, Any] = {"backend": "heuristic", "failures": [], "filled_from_heuristic": []}
    return _record(raw, cfg, counter, None, sentences, token_counts, heur, heur, scoring, blocks, seg_warning,
                   texts, results, t0)  # fmt: skip


async def annotate_trace(
    raw: RawTrace, cfg: AnnotateConfig, counter: TokenCounter, client: LLMClient | None
) -> dict[str, Any]:
    """The record of one trace. Raises when a block ends up with no memento (the trace is retried)."""
    if client is None:
        return offline_record(raw, cfg, counter)
    t0 = time.perf_counter()
    sentences = split_sentences(raw.thinking, counter, cfg.split)
    token_counts = [counter.count(s) for s in sentences]
    heur = heuristic_scores(sentences)
    res = await llm_scores(client, raw.problem, sentences, cfg.scoring)
    raw_scores: list[float | None] = res.scores
    used, filled = fill_missing(res.scores, heur)
    scoring: dict[str, Any] = {
        "backend": "openai",
        "passes": res.passes,
        "window_sizes": [cfg.scoring.window, cfg.scoring.second_window]
        if cfg.scoring.two_pass
        else [cfg.scoring.window],
        "failures": [asdict(f) for f in res.failures],
        "filled_from_heuristic": filled,
    }
    blocks, seg_warning = _segment(token_counts, used, cfg)
    texts = [block_text(sentences, a, b) for a, b in blocks]
    results = await llm_mementos(client, raw.problem, texts, cfg.mementos)
    return _record(raw, cfg, counter, client, sentences, token_counts, raw_scores, used, scoring, blocks,
                   seg_warning, texts, results, t0)  # fmt: skip


def _segment(token_counts: list[int], scores: list[float], cfg: AnnotateConfig) -> tuple[list, str | None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SegmentationWarning)
        blocks = segment(
            token_counts,
            scores,
            min_block_tokens=cfg.min_block_tokens,
            variance_penalty=cfg.variance_penalty,
            min_blocks=cfg.min_blocks,
            max_blocks=cfg.max_blocks,
        )
    seg_warning = next((str(w.message) for w in caught if issubclass(w.category, SegmentationWarning)), None)
    return blocks, seg_warning


def _record(
    raw: RawTrace,
    cfg: AnnotateConfig,
    counter: TokenCounter,
    client: LLMClient | None,
    sentences: list[str],
    token_counts: list[int],
    raw_scores: list[float | None],
    used: list[float],
    scoring: dict[str, Any],
    blocks: list,
    seg_warning: str | None,
    texts: list[str],
    results: list[MementoResult],
    t0: float,
) -> dict[str, Any]:
    missing = [i for i, r in enumerate(results) if r.memento is None]
    if missing:
        first = results[missing[0]].failures[-1] if results[missing[0]].failures else "no memento"
        raise RuntimeError(f"trace {raw.id}: no memento for block(s) {missing}: {first}")

    block_tokens = [counter.count(t) for t in texts]
    memento_tokens = [counter.count(r.memento or "") for r in results]
    trace = MementoTrace(
        raw.problem, tuple(Block(t, r.memento or "") for t, r in zip(texts, results, strict=True)), raw.answer
    )
    backend = {"name": cfg.backend, "tokenizer": counter.name}
    if client is not None:
        backend.update(client.metadata())
    else:
        backend.update(scoring="heuristic", mementos="extractive")
    return {
        "id": raw.id,
        "index": raw.index,
        "problem": raw.problem,
        "answer": raw.answer,
        "extra": raw.extra,
        "sentences": sentences,
        "token_counts": token_counts,
        "boundary_scores": raw_scores,
        "boundary_scores_used": used,
        "scoring": scoring,
        "blocks": [list(b) for b in blocks],
        "block_tokens": block_tokens,
        "segmentation": {
            "objective": objective(token_counts, used, blocks, variance_penalty=cfg.variance_penalty)
            if blocks
            else None,
            "min_block_tokens": cfg.min_block_tokens,
            "variance_penalty": cfg.variance_penalty,
            "warning": seg_warning,
        },
        "mementos": [r.memento for r in results],
        "memento_tokens": memento_tokens,
        "compression": [compression_ratio(m, b) for m, b in zip(memento_tokens, block_tokens, strict=True)],
        "judge_scores": [r.score for r in results],
        "memento_details": [r.to_dict() for r in results] if client is not None else None,
        "backend": backend,
        "trace": trace.to_dict(),
        "elapsed_s": round(time.perf_counter() - t0, 4),
    }


def _offline_worker(job: tuple[RawTrace, AnnotateConfig]) -> tuple[str, dict[str, Any] | None, str | None]:
    """Process-pool entry point for the offline backend (each process loads its own tokenizer)."""
    raw, cfg = job
    try:
        return raw.id, offline_record(raw, cfg, _worker_counter(cfg.tokenizer)), None
    except Exception as e:  # noqa: BLE001 - recorded, retried on the next run
        return raw.id, None, f"{type(e).__name__}: {e}"


_COUNTERS: dict[str | None, TokenCounter] = {}


def _worker_counter(spec: str | None) -> TokenCounter:
    if spec not in _COUNTERS:
        _COUNTERS[spec] = load_token_counter(spec)
    return _COUNTERS[spec]


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops them (no tracebacks from children)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Output files


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_records(output_dir: Path) -> list[dict[str, Any]]:
    """Records already written; a truncated last line (a kill mid-write) is removed from the file."""
    path = output_dir / RECORDS
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        end = pos + len(line) + 1
        last = i == len(lines) - 1
        if line.strip():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "id" not in rec:
                    raise ValueError("not a record")
                if last:  # complete JSON but no newline: keep it, add the newline below
                    pass
                records.append(rec)
                good_end = min(end, len(data))
            except (json.JSONDecodeError, ValueError, UnicodeDecodeError):
                if not last and any(x.strip() for x in lines[i + 1 :]):
                    raise RuntimeError(
                        f"{path}: line {i + 1} is corrupt and is not the last line; move the file away to start over"
                    ) from None
                log.warning("dropping a truncated last line of %s (%d bytes)", path, len(line))
                break
        else:
            good_end = min(end, len(data))
        pos = end
    if good_end < len(data) or (data and not data.endswith(b"\n")):
        fixed = data[:good_end]
        if fixed and not fixed.endswith(b"\n"):
            fixed += b"\n"
        _atomic_write(path, fixed.decode("utf-8"))
    seen: set[str] = set()
    unique = []
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append(r)
    return unique


def rebuild_traces(output_dir: Path, records: list[dict[str, Any]]) -> None:
    """traces.jsonl is derived from records.jsonl; rewriting it keeps the two consistent."""
    lines = [json.dumps(r["trace"], ensure_ascii=False) + "\n" for r in records if r.get("trace")]
    _atomic_write(output_dir / TRACES, "".join(lines))


class _Writer:
    def __init__(self, output_dir: Path) -> None:
        self._records = (output_dir / RECORDS).open("a", encoding="utf-8")
        self._traces = (output_dir / TRACES).open("a", encoding="utf-8")
        self._errors = output_dir / ERRORS

    def write(self, record: dict[str, Any]) -> None:
        # One write call per line, flushed and synced: a kill leaves at most one truncated last line.
        self._records.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._records.flush()
        os.fsync(self._records.fileno())
        if record.get("trace"):
            self._traces.write(json.dumps(record["trace"], ensure_ascii=False) + "\n")
            self._traces.flush()

    def error(self, trace_id: str, message: str) -> None:
        with self._errors.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"id": trace_id, "error": message, "time": time.time()}) + "\n")

    def close(self) -> None:
        self._records.close()
        self._traces.close()


# ----------------------------------------------------------------------------------------------
# The run


def select_traces(input_path: str | Path, cfg: AnnotateConfig, report: SourceReport) -> list[RawTrace]:
    """This shard's accepted traces, in input order, cut to --limit (before skipping done ones)."""
    out = []
    for raw in iter_traces(input_path, cfg.source, report):
        if raw.index % cfg.shard_count != cfg.shard_index:
            continue
        if cfg.limit is not None and len(out) >= cfg.limit:
            continue  # keep reading so the rejection counts cover the whole shard
        out.append(raw)
    return out


def run(
    input_path: str | Path,
    output_dir: str | Path,
    cfg: AnnotateConfig,
    *,
    counter: TokenCounter | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Annotate every selected trace not yet in `output_dir`; returns counts and the stats.

    Nothing is written before the input, the tokenizer and (for `openai`) the endpoint have been
    checked. Every finished trace is on disk (fsynced) before the next one is reported, whatever
    the worker count, so Ctrl-C or a kill loses at most the traces in flight."""
    from memento.annotate.stats import write_stats

    out = Path(output_dir)
    report = SourceReport()
    todo_all = select_traces(input_path, cfg, report)  # errors in the input surface before any write
    if report.accepted == 0:
        raise no_usable_traces(input_path, report)
    counter = counter or load_token_counter(cfg.tokenizer)
    if cfg.backend == "openai":
        processed, failed, skipped = asyncio.run(_run_llm(todo_all, cfg, counter, out, on_record))
    else:
        todo = _prepare_output(out, cfg, todo_all)
        skipped = len(todo_all) - len(todo)
        processed, failed = _run_offline(todo, cfg, counter, out, on_record)
    records = load_records(out)
    stats = write_stats(
        out, records, report, run_info={"processed": processed, "failed": failed, "config": cfg.public_dict()}
    )
    return RunSummary(out, processed, skipped, failed, report, stats)


def _prepare_output(out: Path, cfg: AnnotateConfig, todo_all: list[RawTrace]) -> list[RawTrace]:
    """Create/repair the output folder; the traces still to do."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out}: is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    done = load_records(out)
    rebuild_traces(out, done)
    done_ids = {r["id"] for r in done}
    _atomic_write(out / "config.json", json.dumps(cfg.public_dict(), indent=2, default=str) + "\n")
    return [r for r in todo_all if r.id not in done_ids]


class _Tally:
    """Writes each finished trace at once, logs failures, stops after too many in a row."""

    def __init__(self, writer: _Writer, cfg: AnnotateConfig, progress: _progress, on_record) -> None:
        self.writer, self.cfg, self.progress, self.on_record = writer, cfg, progress, on_record
        self.processed = self.failed = self.consecutive = 0

    def done(self, trace_id: str, rec: dict[str, Any] | None, err: str | None) -> None:
        if rec is not None:
            self.writer.write(rec)
            self.processed += 1
            self.consecutive = 0
            if self.on_record is not None:
                self.on_record(rec)
        else:
            self.failed += 1
            self.consecutive += 1
            self.writer.error(trace_id, err or "unknown error")
            log.warning("trace %s failed: %s", trace_id, err)
            if self.consecutive >= self.cfg.max_consecutive_failures:
                raise RunAborted(
                    f"{self.consecutive} traces failed in a row (last: {trace_id}: {err}); stopping. "
                    f"Records written so far are kept; fix the cause and rerun the same command to resume."
                )
        self.progress.advance()


def _run_offline(
    todo: list[RawTrace],
    cfg: AnnotateConfig,
    counter: TokenCounter,
    out: Path,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> tuple[int, int]:
    """One trace at a time in this process, or `workers` processes; each result written as it lands."""
    pool = None
    if cfg.workers > 1 and len(todo) > 1:  # started before the progress thread (no fork under threads)
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(min(cfg.workers, len(todo)), _ignore_sigint)
    writer = _Writer(out)
    progress = _progress(cfg.progress, len(todo))
    tally = _Tally(writer, cfg, progress, on_record)
    try:
        if pool is not None:
            for trace_id, rec, err in pool.imap_unordered(_offline_worker, [(raw, cfg) for raw in todo]):
                tally.done(trace_id, rec, err)
        else:
            for raw in todo:
                progress.current(raw)
                try:
                    rec, err = offline_record(raw, cfg, counter, progress.stage), None
                except Exception as e:  # noqa: BLE001 - recorded, retried on the next run
                    rec, err = None, f"{type(e).__name__}: {e}"
                tally.done(raw.id, rec, err)
    finally:
        if pool is not None:
            pool.terminate()  # at once: nothing in flight is worth waiting for on Ctrl-C
            pool.join()
        progress.close()
        writer.close()
    return tally.processed, tally.failed


async def _run_llm(
    todo_all: list[RawTrace],
    cfg: AnnotateConfig,
    counter: TokenCounter,
    out: Path,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> tuple[int, int, int]:
    client = LLMClient(cfg.llm)
    try:
        await client.check_reachable()  # before anything is written
        todo = _prepare_output(out, cfg, todo_all)
        writer = _Writer(out)
        progress = _progress(cfg.progress, len(todo))
        tally = _Tally(writer, cfg, progress, on_record)
        sem = asyncio.Semaphore(cfg.workers)

        async def one(raw: RawTrace) -> tuple[RawTrace, dict[str, Any] | None, str | None]:
            async with sem:
                try:
                    return raw, await annotate_trace(raw, cfg, counter, client), None
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - recorded, retried on the next run
                    return raw, None, f"{type(e).__name__}: {e}"

        tasks = [asyncio.ensure_future(one(r)) for r in todo]
        try:
            for fut in asyncio.as_completed(tasks):
                raw, rec, err = await fut
                tally.done(raw.id, rec, err)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            progress.close()
            writer.close()
    finally:
        await client.close()
    return tally.processed, tally.failed, len(todo_all) - len(todo)


class _progress:
    """A rich progress bar on stderr when enabled (a no-op otherwise); for the trace in hand it
    shows the step, so a trace that takes minutes visibly moves."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._p = None
        self._label = "annotating"
        if enabled and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._p.start()
            self._task = self._p.add_task("annotating", total=total)

    def current(self, raw: RawTrace) -> None:
        self._label = f"{raw.id} ({len(raw.thinking) / 1000:,.0f}K chars)"
        self._describe(self._label)

    def stage(self, text: str) -> None:
        self._describe(f"{self._label}: {text}")

    def _describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
