"""What the commands print (issue 19, items 4 and 8): `--json` is JSON and nothing else for every
command, and piped output (tables, `--help`, errors) is never cut to fit 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine_helpers import one_thread  # noqa: F401 (fixture)
from memento.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TINY_RL = ("--steps 1 --group-size 2 --prompts-per-step 1 --max-new-tokens 4 --micro-batch-size 2 "
           "--rollout-batch-size 2").split()  # fmt: skip
LONG_NAME = "a-generation-whose-name-is-much-longer-than-forty-characters-and-must-stay-whole"


def _run(*args) -> tuple[str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def _documents(stdout: str) -> list:
    """stdout as one JSON document or JSON Lines; anything else fails the test."""
    try:
        return [json.loads(stdout)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    text = "<think><|block_start|>2 + 3 = 5<|block_end|>\n<|summary_start|>5<|summary_end|>\n\n</think>5"
    files = {
        "gen": {"id": LONG_NAME, "text": text},
        "bench": {"id": "a", "problem": "Add 2 and 3.", "answer": "5"},
        "resp": {"id": "a", "response": "\\boxed{5}"},
        "trace": {"problem": "Add.", "blocks": [{"reasoning": "2 + 3 = 5", "memento": "5"}], "answer": "5"},
        "raw": {
            "id": "r",
            "problem": "Add.",
            "cot": "<think>" + "Two plus three is five. " * 60 + "</think>5",
        },
    }
    paths = {}
    for name, record in files.items():
        paths[name] = d / f"{name}.jsonl"
        paths[name].write_text(json.dumps(record) + "\n")
    return paths


def test_json_is_json_for_every_command(inputs, toy_model_dir, tmp_path):
    model, out = str(toy_model_dir), tmp_path
    commands = {
        "kv": ["kv", inputs["gen"]],
        "eval": ["eval", inputs["bench"], "--responses", inputs["resp"], "-o", out / "e"],
        "annotate": ["annotate", inputs["raw"], "-o", out / "a", "--tokenizer", "regex"],
        "generate": ["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "3"],
        "bench": ["bench", "--replay", inputs["gen"], "--model", model],
        "train": [
            "train",
            "--model",
            model,
            "--data",
            inputs["trace"],
            "--output-dir",
            out / "t",
            "--max-steps",
            "1",
        ],
        "demo": ["demo", "--smoke", "--out", out / "d"],
        "rl": ["rl", "--model", model, "--prompts", inputs["bench"], "--output-dir", out / "r", *TINY_RL],
        "probe": ["probe", "--quick", "--out", out / "p"],
    }
    for command, args in commands.items():
        stdout, _ = _run(*args, "--json")
        assert _documents(stdout), f"memento {command} --json printed nothing"


def test_piped_help_keeps_every_flag_name_whole():
    stdout, _ = _run("generate", "--help")
    for flag in ("--keep-last-block-for-answer", "--no-require-assistant-section", "--mask-delimiters"):
        assert flag in stdout
    assert "…" not in stdout
    stdout, _ = _run("--help")
    assert "throughput, peak KV" in stdout  # the end of bench's description: not shortened with "..."


def test_piped_tables_keep_numbers_and_names_whole(inputs, toy_model_dir):
    bench_json = _documents(_run("bench", "--replay", inputs["gen"], "--model", toy_model_dir, "--json")[0])
    table, _ = _run("bench", "--replay", inputs["gen"], "--model", toy_model_dir, "--modes", "memento")
    assert "…" not in table
    for key in bench_json[0]:
        assert key in table  # every column header whole
    memento = next(row for row in bench_json if row["mode"] == "memento")
    assert str(memento["mean_auc_kv"]) in table  # a number that does not depend on timing
    table, _ = _run("kv", inputs["gen"])
    assert LONG_NAME in table and "…" not in table


def test_the_command_line_starts_without_torch():
    """`memento --help`, argument errors and the offline annotator never import torch (seconds on
    a busy machine, and its teardown delays the exit after Ctrl-C): heavy imports belong inside the
    commands, never in a package __init__ or at the top of a CLI module."""
    import subprocess
    import sys

    code = "import sys, memento.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
