"""`memento eval --model` with the real engine on the tiny toy checkpoint: two modes, report files,
KV numbers consistent with an offline replay, and a resume that adds nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memento.cli import app

pytest.importorskip("memento.engine", reason="memento.engine is not in this checkout yet")

PROBLEMS = [
    {"id": "a", "problem": "Add 2 and 3.", "answer": "5"},
    {"id": "b", "problem": "Add 4 and 4.", "answer": "8"},
]


@pytest.mark.slow
def test_eval_toy_model_two_modes(tmp_path, toy_model_dir):
    bench = tmp_path / "toy.jsonl"
    bench.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = tmp_path / "out"
    args = [
        "eval", str(bench), "--model", str(toy_model_dir), "--mode", "full", "--mode", "memento",
        "--n", "2", "--max-new-tokens", "12", "--output-dir", str(out), "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("results.jsonl", "summary.json", "report.md", "run_config.json", "maj_at_k.png"):
        assert (out / name).is_file(), name
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["mode"], r["id"], r["sample"]) for r in records) == sorted(
        (m, p["id"], s) for m in ("full", "memento") for p in PROBLEMS for s in range(2)
    )
    for r in records:
        assert r["output_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
        assert r["peak_kv"] >= r["prompt_tokens"] and isinstance(r["correct"], bool)
        assert r["auc_kv"] >= r["peak_kv"]
    report = (out / "report.md").read_text()
    assert "| | full | memento |" in report and "Peak KV (tokens)" in report

    # same seeds in both modes: the prompt-side numbers agree
    by_key = {(r["mode"], r["id"], r["sample"]): r for r in records}
    assert by_key[("full", "a", 0)]["prompt_tokens"] == by_key[("memento", "a", 0)]["prompt_tokens"]

    # a finished run resumes to a no-op; different sampling settings are refused
    before = (out / "results.jsonl").read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (out / "results.jsonl").read_bytes() == before
    result = CliRunner().invoke(app, [*args, "--temperature", "1.0"])
    assert result.exit_code == 2 and "temperature" in result.output
