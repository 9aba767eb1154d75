"""`memento kv` and the KV accounting behind it."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.kv import PRESETS, analyse, kv_bytes_per_token, kv_occupancy
from memento.masking import BlockMaskingConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "memento-outputs"
runner = CliRunner()


def test_presets_and_config_bytes(tmp_path):
    assert PRESETS["qwen3-8b"] == 144 * 1024
    assert kv_bytes_per_token(preset="qwen3-32b") == 256 * 1024
    assert kv_bytes_per_token(preset="phi-4") == 200 * 1024
    cfg = {
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert kv_bytes_per_token(tmp_path) == 144 * 1024
    with pytest.raises(ValueError, match="unknown KV preset"):
        kv_bytes_per_token(preset="nope")
    with pytest.raises(ValueError, match="lacks"):
        kv_bytes_per_token({"num_hidden_layers": 2})


def test_analyse_matches_occupancy(toy_tokenizer, markers):
    from memento.format import Block, MementoTrace

    trace = MementoTrace("q", (Block("a b c d e f", "s"), Block("g h i j", "t")), "x")
    prompt = toy_tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False
    )
    p_ids = toy_tokenizer.encode(prompt)
    ids = p_ids + toy_tokenizer.encode(trace.render())
    r = analyse(ids, len(p_ids), markers)
    occ = kv_occupancy(ids, markers, BlockMaskingConfig())
    assert r.memento_trace == occ[len(p_ids) - 1 : -1]
    assert r.full_trace == list(range(len(p_ids), len(ids)))
    assert r.blocks == 2 and r.memento_peak < r.full_peak and 0 < r.compression < 1


def test_cli_on_example_file(tmp_path):
    plot = tmp_path / "kv.png"
    result = runner.invoke(
        app,
        [
            "kv",
            str(REPO / "examples" / "toy-traces.jsonl"),
            "--json",
            "--preset",
            "qwen3-8b",
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total"]["generations"] == 3 and data["total"]["peak_reduction"] > 2
    assert all(t["memento_peak_bytes"] < t["full_peak_bytes"] for t in data["traces"])
    assert plot.stat().st_size > 1000
    table = runner.invoke(app, ["kv", str(REPO / "examples" / "toy-traces.jsonl")])
    assert table.exit_code == 0 and "lower" in table.stdout


def test_cli_on_real_outputs():
    if not SHARED.exists():
        pytest.skip(f"shared data not present at {SHARED}")
    result = runner.invoke(app, ["kv", str(SHARED / "aime25-p5-qwen3.json"), "--json"])
    assert result.exit_code == 0, result.output
    total = json.loads(result.stdout)["total"]
    assert total["blocks"] == 5 and total["peak_reduction"] > 1.5


def test_cli_errors_name_the_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "<think>x</think>"}\n{"nothing": 1}\n')
    result = runner.invoke(app, ["kv", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    result = runner.invoke(app, ["kv", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "cannot read" in result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "<think><|block_start|>a b c"}\n')
    result = runner.invoke(app, ["kv", str(broken)])
    assert result.exit_code == 0 and "unclosed_block" in result.output


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout.startswith("memento ")
    assert "kv" in runner.invoke(app, ["--help"]).stdout
