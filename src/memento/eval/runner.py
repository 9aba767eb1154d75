"""Running an evaluation: generate (or read) responses, grade each, append one line per sample.

The results file is the single source of truth and makes every run resumable: a line is
appended and flushed as soon as a sample is graded, its key is (mode, id, sample), and a run
that was killed mid-write loses at most its truncated last line, which is dropped on restart.
Each sample gets its own seed derived from (seed, problem, sample), so what a resumed run
generates does not depend on what was already done or on batching.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memento.eval.benchmarks import Benchmark, Problem
from memento.eval.grading import grade
from memento.eval.retokenize import Retokenizer, token_counter
from memento.jsonl import read_jsonl
from memento.kv import block_stats, compress_steps, compress_trace, kv_stats
from memento.masking import MODES, BlockMaskingConfig, config_for_mode

RESULTS = "results.jsonl"
RUN_CONFIG = "run_config.json"
Key = tuple[str, str, int]  # (mode, id, sample)

# The paper's samples per problem (App. A.2.2): 64 on competition math, 2 on everything else.
COMPETITION_MATH_SAMPLES = 64
OTHER_SAMPLES = 2
_COMPETITION = ("aime", "hmmt", "amc", "brumo", "cmimc", "smt", "olympiad", "imo", "usamo", "comp")


def is_competition_math(benchmark_name: str) -> bool:
    """A competition-math benchmark by its file name (AIME, HMMT, AMC, BRUMO, CMIMC, ...)."""
    name = benchmark_name.lower()
    return any(tag in name for tag in _COMPETITION)


def default_samples(benchmark_name: str) -> int:
    """`--n` when not given: the paper's 64 for competition math, 2 otherwise."""
    return COMPETITION_MATH_SAMPLES if is_competition_math(benchmark_name) else OTHER_SAMPLES


@dataclass(frozen=True)
class GenerationConfig:
    """What decides the generated text; a resumed run must match it (checked via run_config.json)."""

    model: str
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32000
    seed: int = 0
    prompt_template: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    kv_budget_tokens: int | None = None
    batch_size: int = 16
    masking: dict | None = None  # BlockMaskingConfig fields that differ from the defaults

    @property
    def masking_config(self) -> BlockMaskingConfig | None:
        return BlockMaskingConfig.from_dict(self.masking) if self.masking else None

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
        if not d["masking"]:
            d.pop("masking")  # default eviction: the same fingerprint as runs made before the option
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

    def discard(self, keys: set[Key]) -> None:
        """Remove these keys' lines (the file is rewritten atomically)."""
        if not keys & self.keys:
            return
        self.records = [r for r in self.records if self.key(r) not in keys]
        self.keys -= keys
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

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
    """Refuse to mix results made with different generation settings in one results file.

    Only results already there can conflict: a `run_config.json` left by a run that wrote no
    result (a typo in --model, a model that failed to load) never blocks the corrected rerun."""
    path = output_dir / RUN_CONFIG
    results = output_dir / RESULTS
    has_results = results.is_file() and results.stat().st_size > 0
    if path.exists() and has_results and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if old is not None and old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(
                f"{output_dir} holds results made with different settings ({', '.join(diff)}); "
                "use another --output-dir, or --overwrite to start over"
            )


def write_run_config(output_dir: Path, config: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    window_traces: dict[int, list[int]] | None = None,
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
    if window_traces:
        record["kv_runs_window"] = {str(w): compress_steps(t) for w, t in sorted(window_traces.items())}
    record["response"] = response
    return record


def window_traces(
    ids: Sequence[int], prompt_len: int, markers, config: BlockMaskingConfig, windows: Sequence[int]
) -> dict[int, list[int]]:
    """The KV trace of each sliding-window size (`memento.kv.kv_stats(..., window=W)`): what a layer
    with that window holds at each generated token, for the GB of models with such layers."""
    if not windows or len(ids) <= prompt_len:
        return {}
    return {w: kv_stats(ids, markers, config, max(prompt_len, 1), window=w).trace for w in windows}


# --- generation through the engine --------------------------------------------------------------


def default_engine_factory(config: GenerationConfig) -> Callable[[str], object]:
    def make(mode: str):
        from memento.engine import Engine

        try:
            return Engine.from_pretrained(
                config.model,
                mode=mode,
                masking=config.masking_config,
                dtype=config.dtype,
                device=config.device,
                kv_budget_tokens=config.kv_budget_tokens,
                max_batch_size=config.batch_size,
            )
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
            raise ValueError(
                f"--model {config.model}: cannot load the model ({type(exc).__name__}: {exc})"
            ) from None

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
    windows: Sequence[int] = (),
) -> int:
    """Generate every missing (mode, problem, sample) and append its graded line; returns how many
    were generated. Already present keys are skipped, so rerunning after a kill resumes. `windows`:
    the model's sliding-window sizes, whose KV traces are recorded too (for GB by layer type)."""
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

                def write(out, chunk=chunk, mode=mode, count=count, engine=engine) -> None:
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
                        window_traces=window_traces(
                            list(out.prompt_ids) + list(out.output_ids),
                            len(out.prompt_ids),
                            engine.markers,
                            engine.config,
                            windows,
                        )
                        if windows
                        else None,
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
    where: str = ""  # file:line, for messages


def column_names(paths: Sequence[str | Path]) -> list[str]:
    """The report column of each responses file: its name without extension, with as many parent
    folders as it takes to tell files apart (`runA/responses`, `runB/responses`)."""
    resolved = [Path(p).resolve() for p in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ValueError(f"--responses {paths[i]} is given twice")
    parts = [list(p.with_suffix("").parts) for p in resolved]
    depth = 1
    while True:
        names = ["/".join(ps[-depth:]) for ps in parts]
        if len(set(names)) == len(names) or depth >= max(len(ps) for ps in parts):
            return names
        depth += 1


def _int_list(value, name: str, where: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise ValueError(f"{where}: {name!r} must be a list of non-negative integers (token ids)")
    return value


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
        if isinstance(rec["id"], bool) or not isinstance(rec["id"], str | int):
            raise ValueError(f"{where}: 'id' must be a string or an integer, got {rec['id']!r}")
        pid = str(rec["id"])
        if pid not in known:
            raise ValueError(f"{where}: id {pid!r} is not in benchmark {benchmark.name!r} (check --id-field)")
        response = rec["response"]
        if response is None:
            response = ""  # no answer produced: graded as wrong, not skipped
        if not isinstance(response, str):
            raise ValueError(f"{where}: 'response' must be a string, got {type(response).__name__}")
        mode = rec.get("mode") or mode_default
        if not isinstance(mode, str):
            raise ValueError(f"{where}: 'mode' must be a string, got {mode!r}")
        if "sample" in rec:
            sample = rec["sample"]
            if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
                raise ValueError(f"{where}: 'sample' must be a non-negative integer, got {sample!r}")
        else:
            sample = counters.get((mode, pid), 0)
        counters[(mode, pid)] = max(counters.get((mode, pid), 0), sample + 1)
        key = (mode, pid, sample)
        if key in seen:
            raise ValueError(f"{where}: duplicate response for id {pid!r} sample {sample} (mode {mode!r})")
        seen.add(key)
        ids = _int_list(rec.get("token_ids"), "token_ids", where)
        pids = _int_list(rec.get("prompt_ids"), "prompt_ids", where)
        out.append(ResponseRecord(pid, sample, response, mode, ids, pids, where=where))
    if not out:
        raise ValueError(f"{path}: no responses (the file is empty)")
    return out


def read_all_responses(
    paths: Sequence[str | Path], benchmark: Benchmark, mode: str | None = None
) -> list[ResponseRecord]:
    """Every responses file, each in its own column (see `column_names`; `mode` names the column
    of a single file); a (column, id, sample) given twice across files is an error, never a
    silent drop."""
    names = [mode] if mode is not None and len(paths) == 1 else column_names(paths)
    records: list[ResponseRecord] = []
    first: dict[Key, str] = {}
    for path, name in zip(paths, names, strict=True):
        for r in read_responses(path, benchmark, name):
            key = (r.mode, r.id, r.sample)
            if key in first:
                raise ValueError(
                    f"{r.where}: response for id {r.id!r} sample {r.sample} in column {r.mode!r} is also "
                    f"at {first[key]}; give each file its own 'mode' (or a different name)"
                )
            first[key] = r.where
            records.append(r)
    return records


def response_fingerprint(r: ResponseRecord, problem: Problem, kind: str, measure: str | list | None) -> str:
    """What a graded line depends on: the response (text and ids), the gold answer, the grading
    kind and how tokens were measured. A rerun regrades exactly the lines whose fingerprint moved."""
    payload = [r.response, r.token_ids, r.prompt_ids, problem.answer, problem.problem, kind, measure]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def grade_responses(
    benchmark: Benchmark,
    responses: Iterable[ResponseRecord],
    results: ResultsFile,
    *,
    retokenizer: Retokenizer | None = None,
    progress: Progress | None = None,
    masking: BlockMaskingConfig | None = None,
    windows: Sequence[int] = (),
) -> int:
    """Grade (and, with a tokenizer, KV-replay under `masking` and each sliding `windows` size)
    responses made elsewhere. Lines already graded from
    the same inputs are kept; lines of these columns whose response, gold answer or measuring
    changed, or that are no longer in the files, are dropped and regraded (so a rerun after
    fixing the inputs shows the new grades). Returns how many lines were graded."""
    known = benchmark.by_id()
    progress = progress or Progress()
    measure = retokenizer.signature if retokenizer is not None else None
    if retokenizer is not None and (masking is not None or windows):  # KV numbers depend on them too
        measure = [measure, masking.to_dict() if masking else None, sorted(windows)]
    current = {
        (r.mode, r.id, r.sample): (r, response_fingerprint(r, known[r.id], benchmark.kind, measure))
        for r in responses
        if r.id in known
    }
    modes = {key[0] for key in current}
    stale = {
        results.key(rec)
        for rec in results.records
        if rec["mode"] in modes
        and (results.key(rec) not in current or rec.get("source") != current[results.key(rec)][1])
    }
    results.discard(stale)
    todo = [(r, fp) for key, (r, fp) in current.items() if key not in results.keys]
    if not todo:
        return 0
    progress.start(f"{benchmark.name} [grading]", len(todo))
    produced = 0
    try:
        for r, fingerprint in todo:
            problem = known[r.id]
            peak = auc = None
            trace: list[int] | None = None
            by_window: dict[int, list[int]] = {}
            extra: dict = {"source": fingerprint}
            if retokenizer is not None:
                prompt = r.prompt_ids if r.prompt_ids is not None else retokenizer.prompt_ids(problem.problem)
                output = r.token_ids if r.token_ids is not None else retokenizer.output_ids(r.response)
                retokenizer.check_ids(prompt + output, r.where)
                kv_mode = r.mode if r.mode in MODES else "memento"
                config = config_for_mode(kv_mode, masking)
                if output:
                    stats = kv_stats(prompt + output, retokenizer.markers, config, max(len(prompt), 1))
                    peak, auc, trace = stats.peak, stats.auc, stats.trace
                else:
                    peak, auc, trace = len(prompt), 0, []
                by_window = window_traces(prompt + output, len(prompt), retokenizer.markers, config, windows)
                extra.update(prompt_tokens=len(prompt), output_tokens=len(output))
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
                window_traces=by_window,
                extra=extra,
            )
            if results.append(record):
                produced += 1
            progress.advance()
    finally:
        progress.stop()
    return produced
