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
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from memento.annotate.llm import EndpointUnreachable, LLMClient, LLMConfig
from memento.annotate.mementos import (
    ExtractiveConfig,
    MementoConfig,
    MementoResult,
    block_text,
    compression_ratio,
    extractive_memento,
    llm_memento,
)
from memento.annotate.scoring import ScoringConfig, fill_missing, heuristic_scores, llm_scores
from memento.annotate.segmentation import SegmentationWarning, objective, segment
from memento.annotate.sentences import SplitConfig, TokenCounter, load_token_counter, split_sentences
from memento.annotate.sources import RawTrace, SourceConfig, SourceReport, iter_traces
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
        if self.workers < 1 or self.min_block_tokens < 0 or self.variance_penalty < 0:
            raise ValueError("workers must be >= 1, min_block_tokens and variance_penalty >= 0")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must be >= 0")

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


async def annotate_trace(
    raw: RawTrace, cfg: AnnotateConfig, counter: TokenCounter, client: LLMClient | None
) -> dict[str, Any]:
    """The record of one trace. Raises when a block ends up with no memento (the trace is retried)."""
    t0 = time.perf_counter()
    sentences = split_sentences(raw.thinking, counter, cfg.split)
    token_counts = [counter.count(s) for s in sentences]
    heur = heuristic_scores(sentences)
    scoring: dict[str, Any] = {"backend": cfg.backend if cfg.backend == "openai" else "heuristic"}
    if client is not None:
        res = await llm_scores(client, raw.problem, sentences, cfg.scoring)
        raw_scores: list[float | None] = res.scores
        used, filled = fill_missing(res.scores, heur)
        scoring.update(
            passes=res.passes,
            window_sizes=[cfg.scoring.window, cfg.scoring.second_window]
            if cfg.scoring.two_pass
            else [cfg.scoring.window],
            failures=[asdict(f) for f in res.failures],
            filled_from_heuristic=filled,
        )
    else:
        raw_scores, used = list(heur), list(heur)
        scoring.update(failures=[], filled_from_heuristic=[])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SegmentationWarning)
        blocks = segment(
            token_counts,
            used,
            min_block_tokens=cfg.min_block_tokens,
            variance_penalty=cfg.variance_penalty,
            min_blocks=cfg.min_blocks,
            max_blocks=cfg.max_blocks,
        )
    seg_warning = next((str(w.message) for w in caught if issubclass(w.category, SegmentationWarning)), None)
    texts = [block_text(sentences, a, b) for a, b in blocks]

    if client is not None:
        results = await asyncio.gather(*(llm_memento(client, raw.problem, t, cfg.mementos) for t in texts))
    else:
        results = [MementoResult(extractive_memento(t, counter, cfg.extractive), None) for t in texts]
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


def _offline_worker(raw: RawTrace, cfg: AnnotateConfig) -> dict[str, Any]:
    """Process-pool entry point for the offline backend (each process loads its own tokenizer)."""
    return asyncio.run(annotate_trace(raw, cfg, load_token_counter(cfg.tokenizer), None))


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
    """Annotate every selected trace not yet in `output_dir`; returns counts and the stats."""
    from memento.annotate.stats import write_stats

    out = Path(output_dir)
    report = SourceReport()
    todo_all = select_traces(input_path, cfg, report)  # errors in the input surface before any write
    counter = counter or load_token_counter(cfg.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    done = load_records(out)
    rebuild_traces(out, done)
    done_ids = {r["id"] for r in done}
    todo = [r for r in todo_all if r.id not in done_ids]
    _atomic_write(out / "config.json", json.dumps(cfg.public_dict(), indent=2, default=str) + "\n")

    processed, failed = asyncio.run(_run_async(todo, cfg, counter, out, on_record))
    records = load_records(out)
    stats = write_stats(
        out, records, report, run_info={"processed": processed, "failed": failed, "config": cfg.public_dict()}
    )
    return RunSummary(out, processed, len(todo_all) - len(todo), failed, report, stats)


async def _run_async(
    todo: list[RawTrace],
    cfg: AnnotateConfig,
    counter: TokenCounter,
    out: Path,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> tuple[int, int]:
    client: LLMClient | None = None
    if cfg.backend == "openai" and todo:
        client = LLMClient(cfg.llm)
        try:
            await client.check_reachable()
        except EndpointUnreachable:
            await client.close()
            raise
    writer = _Writer(out)
    pool: ProcessPoolExecutor | None = None
    if client is None and cfg.workers > 1 and len(todo) > 1:
        pool = ProcessPoolExecutor(max_workers=cfg.workers)
    sem = asyncio.Semaphore(cfg.workers)
    loop = asyncio.get_running_loop()

    async def one(raw: RawTrace) -> tuple[RawTrace, dict[str, Any] | None, str | None]:
        async with sem:
            try:
                if pool is not None:
                    rec = await loop.run_in_executor(pool, _offline_worker, raw, cfg)
                else:
                    rec = await annotate_trace(raw, cfg, counter, client)
                return raw, rec, None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded, retried on the next run
                return raw, None, f"{type(e).__name__}: {e}"

    processed = failed = consecutive = 0
    tasks = [asyncio.ensure_future(one(r)) for r in todo]
    progress = _progress(cfg.progress, len(todo))
    try:
        for fut in asyncio.as_completed(tasks):
            raw, rec, err = await fut
            if rec is not None:
                writer.write(rec)
                processed += 1
                consecutive = 0
                if on_record is not None:
                    on_record(rec)
            else:
                failed += 1
                consecutive += 1
                writer.error(raw.id, err or "unknown error")
                log.warning("trace %s failed: %s", raw.id, err)
                if consecutive >= cfg.max_consecutive_failures:
                    raise RunAborted(
                        f"{consecutive} traces failed in a row (last: {raw.id}: {err}); stopping. "
                        f"Records written so far are kept; fix the cause and rerun the same command to resume."
                    )
            progress.advance()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.close()
        writer.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            await client.close()
    return processed, failed


class _progress:
    """A rich progress bar when enabled (and a no-op otherwise)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._p = None
        if enabled and total:
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
            )
            self._p.start()
            self._task = self._p.add_task("annotating", total=total)

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
