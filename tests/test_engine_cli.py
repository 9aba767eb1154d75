"""`memento generate` and `memento bench --replay` on the toy checkpoint."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine_helpers import one_thread  # noqa: F401 (fixture)
from memento.cli import app
from memento.kv import kv_stats
from memento.masking import BlockMaskingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def test_generate_json(toy_model_dir, markers, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"messages": [{"role": "user", "content": "What is 3 + 4?"}]})
        + "\n"
        + json.dumps({"prompt": "raw text"})
        + "\n"
    )
    args = ["generate", "--model", str(toy_model_dir), "--prompts", str(prompts), "--json"]
    args += ["--max-new-tokens", "6", "--seed", "3", "--n", "2", "--keep-last-n-blocks", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["prompt_index"], r["sample"]) for r in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    config = BlockMaskingConfig(keep_last_n_blocks=1)
    for r in lines:
        assert r["kv_trace"] == kv_stats(r["token_ids"], markers, config, r["prompt_len"]).trace
        assert {"text", "evictions", "peak_kv", "auc_kv", "seconds"} <= set(r)
    assert "assistant" in result.stderr  # the raw prompt has no assistant header: warned


def test_generate_text_and_errors(toy_model_dir):
    ok = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(toy_model_dir),
            "--prompt",
            "Hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
        ],
    )
    assert ok.exit_code == 0, ok.output
    both = runner.invoke(app, ["generate", "--model", str(toy_model_dir)])
    assert both.exit_code == 2 and "--prompt" in both.stderr
    bad = runner.invoke(app, ["generate", "--model", str(toy_model_dir), "--prompt", "x", "--mode", "nope"])
    assert bad.exit_code == 2 and "mode" in bad.stderr


def test_bench_replay_traces(tmp_path):
    traces = tmp_path / "t.jsonl"
    blocks = [
        {"reasoning": f"step {i}: 2 + {i} = {2 + i}, we check it twice", "memento": f"got {2 + i}"}
        for i in range(5)
    ]
    traces.write_text(json.dumps({"problem": "Add numbers.", "blocks": blocks, "answer": "6"}) + "\n")
    result = runner.invoke(app, ["bench", "--replay", str(traces), "--toy", "--repeat", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["mode"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["full"]["generated_tokens"] == rows["memento"]["generated_tokens"]
    assert rows["memento"]["mean_peak_kv"] < rows["full"]["mean_peak_kv"]
