"""The eval runner against the engine contract, with a small fake engine: two modes side by side,
report files, and resume after a kill (torn last line) giving byte-identical results."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memento.eval.benchmarks import load_benchmark
from memento.eval.report import write_report
from memento.eval.runner import (
    GenerationConfig,
    ResultsFile,
    check_run_config,
    generate_results,
    sample_seed,
    write_run_config,
)

PROBLEMS = [
    {"id": "p1", "problem": "What is 1+1?", "answer": "2"},
    {"id": "p2", "problem": "What is half of one?", "answer": "\\frac{1}{2}"},
    {"id": "p3", "problem": "What is 3*3?", "answer": "9"},
]


@pytest.fixture
def bench_file(tmp_path) -> Path:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 97 for c in text]


@dataclass
class _Out:
    prompt_index: int
    sample: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    kv_trace: list[int]
    peak_kv: int
    auc_kv: int
    seconds: float = 0.5
    evictions: list = field(default_factory=list)


class FakeEngine:
    """Follows the contract: chat_prompt, generate(prompts, params, progress) -> outputs in order.

    Each output depends only on its prompt and seed; `crash_after` simulates a kill."""

    answers = {p["problem"]: p["answer"] for p in PROBLEMS}

    def __init__(self, mode: str, crash_after: int | None = None) -> None:
        self.mode = mode
        self.tokenizer = _Tok()
        self.crash_after = crash_after
        self.calls = 0

    def chat_prompt(self, messages):
        return "<|im_start|>user\n" + messages[-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n"

    def generate(self, prompts, sampling, progress=None):
        outs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
            rng = random.Random(params.seed)
            problem = prompt.split("\n")[1].split("<|im_end|>")[0]
            right = rng.random() < 0.6
            answer = self.answers[problem] if right else str(rng.randint(10, 99))
            blocks = rng.randint(1, 3)
            body = "".join(
                f"<|block_start|>{'step ' * rng.randint(4, 9)}<|block_end|>\n<|summary_start|>s<|summary_end|>\n\n"
                for _ in range(blocks)
            )
            text = f"<think>\n{body}</think>\n\nThe answer is $\\boxed{{{answer}}}$."
            growth = 10 * blocks
            trace = (
                list(range(20, 20 + growth))
                if self.mode == "full"
                else [20 + (j % 10) for j in range(growth)]
            )
            out = _Out(i, 0, [1] * 20, [2] * growth, text, "stop", trace, max(trace), sum(trace))
            self.calls += 1
            if self.crash_after is not None and self.calls > self.crash_after:
                raise KeyboardInterrupt("simulated kill")
            if progress is not None:
                progress(out)
            outs.append(out)
        return outs


def _config(**kw) -> GenerationConfig:
    return GenerationConfig(model="fake", n=kw.pop("n", 4), max_new_tokens=64, **kw)


def _run(bench_file, out_dir, modes=("full", "memento"), crash_after=None, n=4, chunk_size=5):
    bench = load_benchmark(bench_file)
    results = ResultsFile(out_dir / "results.jsonl")
    made = generate_results(
        bench,
        list(modes),
        _config(n=n),
        results,
        engine_factory=lambda mode: FakeEngine(mode, crash_after),
        chunk_size=chunk_size,
    )
    return bench, results, made


def test_two_modes_side_by_side_report(bench_file, tmp_path):
    out = tmp_path / "out"
    bench, results, made = _run(bench_file, out)
    assert made == 2 * 3 * 4
    keys = [(r["mode"], r["id"], r["sample"]) for r in results.records]
    assert len(keys) == len(set(keys)) == 24
    line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    for name in (
        "id",
        "sample",
        "correct",
        "extracted",
        "mode",
        "response",
        "gold",
        "peak_kv",
        "auc_kv",
        "blocks",
    ):
        assert name in line
    assert line["block_tokens"] > 0 and line["memento_tokens"] > 0 and line["compression"] > 0
    summary = write_report(
        out,
        results.records,
        benchmark=bench.name,
        kind=bench.kind,
        problems=len(bench),
        order=["full", "memento"],
        bytes_per_token=1000,
    )
    for name in ("summary.json", "report.md", "kv_curves.png", "compression_cdf.png", "maj_at_k.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| | full | memento |" in report
    assert "(×" in report and "Peak KV (tokens)" in report and "Jaccard" in report
    runs = summary["runs"]
    assert runs["memento"]["peak_kv"] < runs["full"]["peak_kv"]
    # the fake samples depend only on the seed, so both modes grade identically
    assert runs["memento"]["pass@1"] == runs["full"]["pass@1"]
    assert set(runs["full"]["maj@k"]) == {"1", "2", "4"}
    assert summary["comparisons"][0]["jaccard"] == 1.0
    assert runs["full"]["peak_kv_gb"] == pytest.approx(runs["full"]["peak_kv"] * 1000 / 1e9)
    # pass@1 recomputed by hand from the results file
    by_problem: dict = {}
    for r in results.records:
        if r["mode"] == "full":
            by_problem.setdefault(r["id"], []).append(r["correct"])
    assert runs["full"]["pass@1"] == pytest.approx(sum(sum(v) / len(v) for v in by_problem.values()) / 3)


def test_resume_after_torn_line_is_identical(bench_file, tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    _run(bench_file, ref_dir)
    reference = (ref_dir / "results.jsonl").read_bytes()

    cut_dir.mkdir()
    lines = reference.split(b"\n")
    torn = b"\n".join(lines[:7]) + b"\n" + lines[7][: len(lines[7]) // 2]  # killed mid-line
    (cut_dir / "results.jsonl").write_bytes(torn)
    _, results, made = _run(bench_file, cut_dir)
    assert made == 24 - 7
    assert (cut_dir / "results.jsonl").read_bytes() == reference

    # running again generates nothing and changes nothing
    _, _, made = _run(bench_file, cut_dir)
    assert made == 0
    assert (cut_dir / "results.jsonl").read_bytes() == reference


def test_resume_after_crash_mid_generation(bench_file, tmp_path):
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    _run(bench_file, ref_dir)
    with pytest.raises(KeyboardInterrupt):
        _run(bench_file, crash_dir, crash_after=3)
    assert len((crash_dir / "results.jsonl").read_text().splitlines()) == 3
    _run(bench_file, crash_dir, chunk_size=7)  # different batching, same samples
    assert (crash_dir / "results.jsonl").read_bytes() == (ref_dir / "results.jsonl").read_bytes()


def test_more_samples_extend_a_finished_run(bench_file, tmp_path):
    _, _, made = _run(bench_file, tmp_path, modes=("memento",), n=2)
    assert made == 6
    _, results, made = _run(bench_file, tmp_path, modes=("memento",), n=3)
    assert made == 3 and len(results.records) == 9


def test_results_file_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "results.jsonl"
    good = json.dumps({"mode": "m", "id": "1", "sample": 0})
    path.write_text(good + "\n{broken\n" + good + "\n")
    with pytest.raises(ValueError, match=":2:"):
        ResultsFile(path)


def test_results_file_keeps_complete_unterminated_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"mode": "m", "id": "1", "sample": 0}))
    rf = ResultsFile(path)
    assert rf.keys == {("m", "1", 0)}
    assert path.read_text().endswith("\n")
    assert rf.append({"mode": "m", "id": "1", "sample": 1})
    assert not rf.append({"mode": "m", "id": "1", "sample": 1})
    assert len(path.read_text().splitlines()) == 2


def test_run_config_mismatch_is_refused(tmp_path):
    first = {"model": "a", "temperature": 0.6}
    check_run_config(tmp_path, first)
    write_run_config(tmp_path, first)
    # no result written yet (e.g. the model failed to load): other settings are fine
    check_run_config(tmp_path, {"model": "b", "temperature": 0.6})
    ResultsFile(tmp_path / "results.jsonl").append({"mode": "m", "id": "1", "sample": 0})
    check_run_config(tmp_path, first)
    with pytest.raises(ValueError, match="temperature"):
        check_run_config(tmp_path, {"model": "a", "temperature": 1.0})
    check_run_config(tmp_path, {"model": "a", "temperature": 1.0}, overwrite=True)


def test_config_validation_and_seeds():
    with pytest.raises(ValueError, match="prompt-template"):
        GenerationConfig(model="m", prompt_template="no placeholder")
    with pytest.raises(ValueError):
        GenerationConfig(model="m", n=0)
    seeds = {sample_seed(0, p, s) for p in range(50) for s in range(16)}
    assert len(seeds) == 800


def test_unknown_mode_is_an_error(bench_file, tmp_path):
    with pytest.raises(ValueError, match="unknown mode"):
        _run(bench_file, tmp_path, modes=("fast",))
