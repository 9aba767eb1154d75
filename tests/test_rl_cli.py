"""`memento rl` at the command line: bad inputs give one line and exit 2 before anything loads or is
written; the toy demonstration runs end to end at its smoke size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memento.cli import app

runner = CliRunner()


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"problem": "Count from 1 to 3.", "answer": "3"}) + "\n")
    return path


def run(*args: str):
    return runner.invoke(app, ["rl", *args])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--group-size", "1"], "group_size must be >= 2"),
        (["--temperature", "0"], "temperature must be a positive number"),
        (["--eps-high", "-1"], "eps_high must be a number >= 0"),
        (["--mode", "restart"], "mode must be one of"),
        (["--reward", "nope"], "--reward must be one of exact, math, choice or MODULE:FUNCTION"),
        (["--reward", "no_such_module_xyz:f"], "cannot import module"),
        (["--updates-per-step", "5", "--prompts-per-step", "2"], "cannot exceed prompts_per_step"),
        (["--masking-config", '{"keep_last": 1}'], "unknown block-masking option"),
        (["--device", "cuda:7"], "--device"),
    ],
)
def test_bad_options_are_one_line_exit_2(toy_model_dir, prompts, tmp_path, extra, message):
    out = tmp_path / "out"
    result = run("--model", str(toy_model_dir), "--prompts", str(prompts), "--output-dir", str(out), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists(), "nothing is written before the inputs are checked"


def test_bad_files_are_named(toy_model_dir, prompts, tmp_path):
    out = str(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x"}\n{"answer": 1\n')
    cases = [
        (["--model", str(tmp_path / "nope"), "--prompts", str(prompts)], "--model"),
        (["--model", str(toy_model_dir), "--prompts", str(tmp_path / "none.jsonl")], "--prompts"),
        (["--model", str(toy_model_dir), "--prompts", str(bad)], "bad.jsonl:1"),
        (
            ["--model", str(toy_model_dir), "--prompts", str(prompts), "--eval-prompts", str(bad)],
            "--eval-prompts",
        ),
        (["--model", str(toy_model_dir), "--prompts", str(prompts), "--unknown-flag"], "No such option"),
        (["--prompts", str(prompts)], "missing required option(s) ['model']"),
    ]
    for args, message in cases:
        result = run(*args, "--output-dir", out)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not Path(out).exists()


def test_a_model_without_markers_is_refused(tmp_path, prompts):
    from memento.toy import build_tiny_model, build_tokenizer
    from memento.toy.kit import save_toy_model

    tokenizer = build_tokenizer(with_markers=False)
    save_toy_model(
        tmp_path / "plain", tokenizer, build_tiny_model(tokenizer, layers=1, hidden=32, heads=2, kv_heads=1)
    )
    result = run(
        "--model", str(tmp_path / "plain"), "--prompts", str(prompts), "--output-dir", str(tmp_path / "o")
    )
    assert result.exit_code == 2
    assert "RL starts from a MEMENTO (Stage 2) checkpoint" in result.output


def test_demo_smoke_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = run("--demo", "--smoke", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = _json_line(result.output)
    assert report["held_out"]["start"]["step"] == 0 and report["held_out"]["end"]["step"] == 2
    assert (out / "start" / "model-memento" / "config.json").is_file()
    assert (out / "rl-seed0" / "curves.png").is_file() and (out / "rl-seed0" / "report.json").is_file()
    again = run("--demo", "--smoke", "--out", str(out), "--json")  # resumes: nothing left to train
    assert again.exit_code == 0, again.output
    assert _json_line(again.output)["held_out"] == report["held_out"]


def _json_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))
