"""Running an evaluation: generate (or read) responses, grade each, append one line per sample.

The results file is the single source of truth and makes every run resumable: a line is
appended and flushed as soon as a sample is graded, its key is (mode, id, sample), and a run
that was killed mid-write loses at most its truncated last line, which is dropped on restart.
Each sample gets its own seed derived from (seed, problem, sample), so what a resumed run
generates does not depend on what was already done or on batching.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memento.eval.benchmarks import Benchmark, Problem
from memento.eval.grading import grade
from memento.eval.retokenize import Retokenizer, token_counter
from memento.jsonl import read_jsonl
from memento.kv import block_stats, compress_trace, replay_kv
from memento.masking import MODES

RESULTS = "results.jsonl"
RUN_CONFIG = "run_config.json"
Key = tuple[str, str, int]  # (mode, id, sample)


@dataclass(frozen=True)
class GenerationConfig:
    """What decides the generated text; a resumed run must match it (checked via run_config.json)."""

    model: str
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32768
    seed: int = 0
    prompt_template: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    kv_budget_tokens: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if self.prompt_template is not None and "{problem}" not in self.prompt_template:
            raise ValueError("--prompt-template must contain {problem}")

    def fingerprint(self) -> dict:
        """The settings that change outputs (not device, batch size or KV budget)."""
        d = asdict(self)
        for k in ("device", "batch_size", "kv_budget_tokens", "n"):
            d.pop(k)
        return d


class ResultsFile:
    """Append-only per-sample JSONL with resume: existing keys are skipped, a torn tail dropped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []
        self.keys: set[Key] = set()
        if self.path.exists():
            self._load()

    @staticmethod
    def key(record: dict) -> Key:
        return (str(record["mode"]), str(record["id"]), int(record["sample"]))

    def _load(self) -> None:
        data = self.path.read_bytes()
        pos = keep = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            line = data[pos:] if newline < 0 else data[pos:newline]
            lineno = data.count(b"\n", 0, pos) + 1
            if line.strip():
                try:
                    record = json.loads(line)
                    key = self.key(record)
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
                    if newline < 0:
                        break  # torn last line of a killed run: dropped below
                    raise ValueError(
                        f"{self.path}:{lineno}: unreadable result line ({exc}); fix or delete that line"
                    ) from exc
                self._add(record, key)
            if newline < 0:  # a whole record that only lacks its newline
                with self.path.open("ab") as fh:
                    fh.write(b"\n")
                return
            pos = keep = newline + 1
        if keep < len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(keep)

    def _add(self, record: dict, key: Key) -> None:
        if key not in self.keys:
            self.keys.add(key)
            self.records.append(record)

    def append(self, record: dict) -> bool:
        """Write one result line (flushed and synced); False if the key is already there."""
        key = self.key(record)
        if key in self.keys:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._add(record, key)
        return True


def sample_seed(seed: int, problem_index: int, sample: int) -> int:
    """A per-sample seed independent of batching and of which samples already exist."""
    return ((seed * 1_000_003 + problem_index) * 10_007 + sample) % (2**31 - 1)


def check_run_config(output_dir: Path, config: dict, overwrite: bool = False) -> None:
    """Refuse to mix outputs from different generation settings in one results file."""
    path = output_dir / RUN_CONFIG
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(
                f"{output_dir} holds results made with different settings ({', '.join(diff)}); "
                "use another --output-dir, or --overwrite to start over"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _sample_record(
    *,
    mode: str,
    problem: Problem,
    sample: int,
    response: str,
    kind: str,
    count: Callable[[str], int] | None,
    peak_kv: int | None,
    auc_kv: int | None,
    kv_trace: Sequence[int] | None,
    extra: dict | None = None,
) -> dict:
    g = grade(response, problem.answer, kind)
    bs = block_stats(response, count)
    record = {
        "mode": mode,
        "id": problem.id,
        "sample": sample,
        "problem_index": problem.index,
        "correct": g.correct,
        "extracted": g.extracted,
        "extraction": g.method,
        "gold": problem.answer,
        "peak_kv": peak_kv,
        "auc_kv": auc_kv,
        "blocks": bs.blocks,
        "block_tokens": bs.block_tokens,
        "memento_tokens": bs.memento_tokens,
        "compression": bs.compression,
        "size_basis": bs.basis,
    }
    record.update(extra or {})
    record["kv_runs"] = compress_trace(kv_trace) if kv_trace else None
    record["response"] = response
    return record


# --- generation through the engine --------------------------------------------------------------


def default_engine_factory(config: GenerationConfig) -> Callable[[str], object]:
    def make(mode: str):
        from memento.engine import Engine

        return Engine.from_pretrained(
            config.model,
            mode=mode,
            dtype=config.dtype,
            device=config.device,
            kv_budget_tokens=config.kv_budget_tokens,
            max_batch_size=config.batch_size,
        )

    return make


def render_prompt(engine, problem: str, template: str | None) -> str:
    content = template.format(problem=problem) if template else problem
    return engine.chat_prompt([{"role": "user", "content": content}])


@dataclass
class Progress:
    """Minimal progress hook: the CLI plugs a rich bar in, tests leave it silent."""

    start: Callable[[str, int], None] = lambda label, total: None
    advance: Callable[[], None] = lambda: None
    stop: Callable[[], None] = lambda: None


def generate_results(
    benchmark: Benchmark,
    modes: Sequence[str],
    config: GenerationConfig,
    results: ResultsFile,
    *,
    engine_factory: Callable[[str], object] | None = None,
    progress: Progress | None = None,
    chunk_size: int = 64,
) -> int:
    """Generate every missing (mode, problem, sample) and append its graded line; returns how many
    were generated. Already present keys are skipped, so rerunning after a kill resumes."""
    from memento.engine import SamplingParams

    factory = engine_factory or default_engine_factory(config)
    progress = progress or Progress()
    produced = 0
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        todo = [
            (p, s) for p in benchmark.problems for s in range(config.n) if (mode, p.id, s) not in results.keys
        ]
        if not todo:
            continue
        engine = factory(mode)
        count = token_counter(engine.tokenizer)
        prompts_by_problem: dict[str, str] = {}
        progress.start(f"{benchmark.name} [{mode}]", len(todo))
        try:
            for lo in range(0, len(todo), chunk_size):
                chunk = todo[lo : lo + chunk_size]
                prompts, params = [], []
                for p, s in chunk:
                    if p.id not in prompts_by_problem:
                        prompts_by_problem[p.id] = render_prompt(engine, p.problem, config.prompt_template)
                    prompts.append(prompts_by_problem[p.id])
                    params.append(
                        SamplingParams(
                            temperature=config.temperature,
                            top_p=config.top_p,
                            top_k=config.top_k,
                            max_new_tokens=config.max_new_tokens,
                            n=1,
                            seed=sample_seed(config.seed, p.index, s),
                        )
                    )

                def write(out, chunk=chunk, mode=mode, count=count) -> None:
                    nonlocal produced
                    p, s = chunk[out.prompt_index]
                    record = _sample_record(
                        mode=mode,
                        problem=p,
                        sample=s,
                        response=out.text,
                        kind=benchmark.kind,
                        count=count,
                        peak_kv=int(out.peak_kv),
                        auc_kv=int(out.auc_kv),
                        kv_trace=list(out.kv_trace),
                        extra={
                            "finish_reason": out.finish_reason,
                            "prompt_tokens": len(out.prompt_ids),
                            "output_tokens": len(out.output_ids),
                            "seconds": round(float(out.seconds), 3),
                        },
                    )
                    if results.append(record):
                        produced += 1
                        progress.advance()

                outputs = engine.generate(prompts, params, progress=write)
                for out in outputs:  # engines that report progress sparsely: write the rest
                    write(out)
        finally:
            progress.stop()
            del engine
    return produced


# --- grading responses produced elsewhere -------------------------------------------------------


@dataclass
class ResponseRecord:
    id: str
    sample: int
    response: str
    mode: str
    token_ids: list[int] | None = None
    prompt_ids: list[int] | None = None
    extra: dict = field(default_factory=dict)


def read_responses(
    path: str | Path, benchmark: Benchmark, default_mode: str | None = None
) -> list[ResponseRecord]:
    """Read a responses JSONL (`id`, `response`, optional `sample`, `mode`, `token_ids`,
    `prompt_ids`); errors name the file and line."""
    path = Path(path)
    known = benchmark.by_id()
    mode_default = default_mode or path.stem
    out: list[ResponseRecord] = []
    seen: set[Key] = set()
    counters: dict[tuple[str, str], int] = {}
    for where, rec in read_jsonl(path, "responses file"):
        if not isinstance(rec, dict) or "id" not in rec or "response" not in rec:
            raise ValueError(f"{where}: each line needs 'id' and 'response'")
        pid = str(rec["id"])
        if pid not in known:
            raise ValueError(f"{where}: id {pid!r} is not in benchmark {benchmark.name!r} (check --id-field)")
        response = rec["response"]
        if not isinstance(response, str):
            response = "" if response is None else str(response)
        mode = str(rec.get("mode") or mode_default)
        if "sample" in rec:
            try:
                sample = int(rec["sample"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: 'sample' must be an integer") from exc
        else:
            sample = counters.get((mode, pid), 0)
        counters[(mode, pid)] = max(counters.get((mode, pid), 0), sample + 1)
        key = (mode, pid, sample)
        if key in seen:
            raise ValueError(f"{where}: duplicate response for id {pid!r} sample {sample} (mode {mode!r})")
        seen.add(key)
        ids = rec.get("token_ids")
        pids = rec.get("prompt_ids")
        for name, value in (("token_ids", ids), ("prompt_ids", pids)):
            if value is not None and not (isinstance(value, list) and all(isinstance(t, int) for t in value)):
                raise ValueError(f"{where}: {name!r} must be a list of integers")
        out.append(ResponseRecord(pid, sample, response, mode, ids, pids))
    return out


def grade_responses(
    benchmark: Benchmark,
    responses: Iterable[ResponseRecord],
    results: ResultsFile,
    *,
    retokenizer: Retokenizer | None = None,
    progress: Progress | None = None,
) -> int:
    """Grade (and, with a tokenizer, KV-replay) responses made elsewhere; resumable like generation."""
    known = benchmark.by_id()
    progress = progress or Progress()
    todo = [r for r in responses if (r.mode, r.id, r.sample) not in results.keys and r.id in known]
    progress.start(f"{benchmark.name} [grading]", len(todo))
    produced = 0
    try:
        for r in todo:
            problem = known[r.id]
            peak = auc = None
            trace: list[int] | None = None
            extra: dict = {}
            if retokenizer is not None:
                prompt = r.prompt_ids if r.prompt_ids is not None else retokenizer.prompt_ids(problem.problem)
                output = r.token_ids if r.token_ids is not None else retokenizer.output_ids(r.response)
                kv_mode = r.mode if r.mode in MODES else "memento"
                peak, auc, trace = replay_kv(prompt + output, len(prompt), retokenizer.markers, kv_mode)
                extra = {"prompt_tokens": len(prompt), "output_tokens": len(output)}
            record = _sample_record(
                mode=r.mode,
                problem=problem,
                sample=r.sample,
                response=r.response,
                kind=benchmark.kind,
                count=retokenizer.count if retokenizer is not None else None,
                peak_kv=peak,
                auc_kv=auc,
                kv_trace=trace,
                extra=extra,
            )
            if results.append(record):
                produced += 1
            progress.advance()
    finally:
        progress.stop()
    return produced
