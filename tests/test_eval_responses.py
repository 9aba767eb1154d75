"""`memento eval BENCH --responses FILE`: grading responses made elsewhere, end to end via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.eval.benchmarks import load_benchmark
from memento.format import segments_to_trace

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
AIME24 = SHARED / "benchmarks" / "aime24.jsonl"
MATH500 = SHARED / "benchmarks" / "math500.jsonl"
OUTPUTS = SHARED / "memento-outputs"

needs_benchmarks = pytest.mark.skipif(
    not AIME24.exists() or not MATH500.exists(),
    reason="shared benchmark files (../shared/data/benchmarks) are not available on this machine",
)
needs_outputs = pytest.mark.skipif(
    not (OUTPUTS / "aime25-p5-qwen3.json").exists(),
    reason="shared MEMENTO outputs (../shared/data/memento-outputs) are not available on this machine",
)

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, ["eval", *map(str, args)])
    return result


@needs_benchmarks
def test_shared_benchmarks_load_with_auto_detected_fields():
    aime = load_benchmark(AIME24)
    assert len(aime) == 30 and aime.kind == "math"
    assert aime.problems[0].id == "60" and aime.problems[0].answer == "204"
    math500 = load_benchmark(MATH500, limit=20)
    assert len(math500) == 20 and math500.kind == "math"
    assert math500.problems[0].id.startswith("test/")  # unique_id
    assert math500.problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


@needs_benchmarks
def test_responses_end_to_end_on_aime24(tmp_path):
    aime = load_benchmark(AIME24, limit=4)
    lines = []
    for i, p in enumerate(aime.problems):
        gold = int(p.answer)
        lines.append(
            {"id": int(p.id), "sample": 0, "response": f"<think>work</think>\n\nSo \\boxed{{{gold}}}."}
        )
        lines.append({"id": int(p.id), "sample": 1, "response": f"Final Answer: {gold + 1}"})
        wrong_or_right = gold if i % 2 == 0 else gold + 7
        lines.append({"id": int(p.id), "sample": 2, "response": f"... the answer is ${wrong_or_right}$"})
    lines.append({"id": 999_999, "sample": 0, "response": "x"})  # not in --limit 4: rejected
    resp = tmp_path / "model-x.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in lines[:-1]))
    out = tmp_path / "out"

    result = _invoke(AIME24, "--responses", resp, "--output-dir", out, "--limit", 4, "--json", "--no-plots")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12
    assert all({"id", "sample", "correct", "extracted", "mode"} <= set(r) for r in records)
    assert [r["correct"] for r in records[:3]] == [True, False, True]
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["model-x"]
    # per problem: 2/3, 1/3, 2/3, 1/3 correct
    assert run["pass@1"] == pytest.approx(0.5)
    assert run["coverage"] == 1.0
    # maj@3: even problems vote gold 2-1 (1.0); odd ones tie 1-1-1 with one right (1/3)
    assert run["maj@k"]["3"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 3) / 4)
    assert (out / "report.md").is_file()

    # grading again is a no-op (resumable like generation)
    result = _invoke(AIME24, "--responses", resp, "--output-dir", out, "--limit", 4, "--no-plots")
    assert result.exit_code == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 12

    # an id that is not in the benchmark is a clear error, and nothing already written is touched
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[-1]) + "\n")
    result = _invoke(AIME24, "--responses", bad, "--output-dir", out, "--limit", 4)
    assert result.exit_code == 2
    assert "999999" in result.output and "not in benchmark" in result.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 12


def test_model_and_responses_are_exclusive(tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"question": "q", "gold": "1"}) + "\n")
    result = _invoke(bench, "--output-dir", tmp_path / "o")
    assert result.exit_code == 2 and "exactly one" in result.output
    result = _invoke(bench, "--model", tmp_path, "--responses", bench, "--output-dir", tmp_path / "o")
    assert result.exit_code == 2


def test_field_mapping_and_choice_kind(tmp_path):
    bench = tmp_path / "gpqa.jsonl"
    rows = [
        {"uid": "q1", "question": "Pick one", "choices": ["x", "y", "z", "w"], "label": "B"},
        {"uid": "q2", "question": "Pick again", "choices": ["x", "y", "z", "w"], "label": "D"},
    ]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = load_benchmark(bench, answer_field="label", id_field="uid")
    assert b.kind == "choice" and "B) y" in b.problems[0].problem
    resp = tmp_path / "r.jsonl"
    resp.write_text(
        json.dumps({"id": "q1", "response": "I'd say **Answer: B**"})
        + "\n"
        + json.dumps({"id": "q2", "response": "between A and C, C"})
        + "\n"
    )
    out = tmp_path / "out"
    result = _invoke(bench, "--responses", resp, "--answer-field", "label", "--id-field", "uid", "-o", out)
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["extracted"], r["correct"]) for r in records] == [("B", True), ("C", False)]
    with pytest.raises(ValueError, match="--problem-field"):
        load_benchmark(bench, problem_field="nope")


@needs_outputs
def test_real_memento_outputs_graded_and_kv_replayed(tmp_path, toy_model_dir):
    """The released MEMENTO generations: answers graded (math and choice), KV replayed with a
    tokenizer under full vs memento semantics, block statistics from the real traces."""
    out_root = tmp_path
    cases = [("aime25-p5-qwen3", "math"), ("gpqa-science", "choice")]
    for name, kind in cases:
        record = json.loads((OUTPUTS / f"{name}.json").read_text())
        trace = segments_to_trace(record, source=name)
        bench = out_root / f"{name}-bench.jsonl"
        bench.write_text(
            json.dumps({"id": name, "problem": record["problem"], "answer": record["answer"]}) + "\n"
        )
        resp = out_root / f"{name}-resp.jsonl"
        text = trace.render()
        resp.write_text(
            json.dumps({"id": name, "mode": "full", "response": text})
            + "\n"
            + json.dumps({"id": name, "mode": "memento", "response": text})
            + "\n"
        )
        out = out_root / f"{name}-out"
        result = _invoke(
            bench,
            "--responses",
            resp,
            "--kind",
            kind,
            "--tokenizer",
            toy_model_dir,
            "--kv-preset",
            "qwen3-8b",
            "-o",
            out,
        )
        assert result.exit_code == 0, result.output
        full, memento = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        assert full["correct"] and memento["correct"], (full["extracted"], record["answer"])
        assert full["blocks"] == memento["blocks"] == len(trace.blocks) > 0
        assert 0 < memento["compression"] < 1 and full["size_basis"] == "tokens"
        assert memento["peak_kv"] < full["peak_kv"]
        assert memento["auc_kv"] < full["auc_kv"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runs"]["memento"]["peak_kv_gb"] < summary["runs"]["full"]["peak_kv_gb"]
        assert (out / "kv_curves.png").is_file()


@needs_benchmarks
def test_math500_reference_solutions_grade_correct():
    """Every MATH-500 reference solution, read as a response, is graded correct against its answer;
    a shifted answer (the next problem's) is not."""
    from memento.eval.grading import grade

    problems = load_benchmark(MATH500).problems
    solutions = [json.loads(line)["solution"] for line in MATH500.read_text().splitlines() if line.strip()]
    wrong = [p.id for p, s in zip(problems, solutions, strict=True) if not grade(s, p.answer).correct]
    assert wrong == []
    shifted = sum(grade(s, q.answer).correct for s, q in zip(solutions[:100], problems[1:101], strict=True))
    assert shifted <= 3  # a few neighbours share an answer
