"""`memento kv` and the KV accounting behind it."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memento.cli import app
from memento.kv import (
    PRESET_SHAPES,
    PRESETS,
    KVShape,
    analyse,
    kv_bytes_per_token,
    kv_occupancy,
    kv_shape,
    layer_windows,
    paged_blocks,
)
from memento.masking import BlockMaskingConfig, evictions, in_window
from memento.tokens import MarkerIds

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
    assert result.exit_code == 2 and "missing.jsonl: no such file" in result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "<think><|block_start|>a b c"}\n')
    result = runner.invoke(app, ["kv", str(broken)])
    assert result.exit_code == 0 and "unclosed_block" in result.output


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout.startswith("memento ")
    assert "kv" in runner.invoke(app, ["--help"]).stdout


# --- per layer type ---------------------------------------------------------------------------------

M = MarkerIds(block_start=10, block_end=11, summary_start=12, summary_end=13, im_start=1, assistant=3)
_stream = st.lists(st.sampled_from([10, 11, 12, 13, 20, 21, 22, 10, 13, 20]), min_size=1, max_size=60)
_configs = st.sampled_from(
    [
        BlockMaskingConfig(),
        BlockMaskingConfig(keep_last_n_blocks=1),
        BlockMaskingConfig(mask_delimiters=True),
        BlockMaskingConfig(keep_last_block_for_answer=True),
        BlockMaskingConfig(restart_mode=True),
        BlockMaskingConfig.full(),
    ]
)


def _held_by_rule(token_ids, cfg, window):
    """Keys query p may attend to, straight from the rule: k <= p, not evicted by a trigger <= p, and
    `masking.in_window` (p - k < W in original positions on a sliding layer)."""
    kill = [len(token_ids) + 1] * len(token_ids)
    for ev in evictions(token_ids, M, cfg):
        for k in range(ev.start, ev.end):
            kill[k] = min(kill[k], ev.trigger)
    return [
        sum(1 for k in range(p + 1) if p < kill[k] and in_window(p, k, window)) for p in range(len(token_ids))
    ]


@settings(max_examples=300, deadline=None)
@given(_stream, _configs, st.one_of(st.none(), st.integers(1, 12)))
def test_occupancy_per_layer_type_follows_the_rule(stream, cfg, window):
    token_ids = [1, 2, 3, *stream]  # IM user assistant: the assistant gate opens at once
    occ = kv_occupancy(token_ids, M, cfg, window)
    assert occ == _held_by_rule(token_ids, cfg, window)
    full = kv_occupancy(token_ids, M, cfg)
    assert all(w <= f for w, f in zip(occ, full, strict=True))
    if window is not None:
        assert max(occ) <= window


def test_sliding_window_counts_original_positions():
    # IM user assistant BS a a a a BE SS s SE x x x: block content [4, 8) evicted at SE (pos 11)
    token_ids = [1, 2, 3, 10, 20, 20, 20, 20, 11, 12, 21, 13, 22, 22, 22]
    # window 6: at the SE (p=11) the window is keys 6..11, of which 6 and 7 are evicted block content;
    # the count recovers as the window slides past them (a "last 6 cached entries" cache would hold 6)
    assert kv_occupancy(token_ids, M, None, 6) == [1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 4, 5, 6, 6]
    assert kv_occupancy(token_ids, M, None, 4)[11] == 4  # the block is already out of a 4-key window
    # full layers drop the 4 block tokens at the SE and then grow again
    assert kv_occupancy(token_ids, M) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="at least 1"):
        kv_occupancy(token_ids, M, None, 0)


def test_layer_windows_from_configs():
    olmo = {
        "num_hidden_layers": 4,
        "sliding_window": 4096,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    }
    assert layer_windows(olmo) == (4096, 4096, 4096, None)
    qwen_off = {"num_hidden_layers": 3, "sliding_window": 4096, "use_sliding_window": False}
    assert layer_windows(qwen_off) == (None, None, None)
    qwen_on = {
        "num_hidden_layers": 3,
        "sliding_window": 8,
        "use_sliding_window": True,
        "max_window_layers": 1,
    }
    assert layer_windows(qwen_on) == (None, 8, 8)
    assert layer_windows({"num_hidden_layers": 2, "sliding_window": 2047}) == (2047, 2047)  # Mistral, Phi-3
    assert layer_windows({"num_hidden_layers": 2, "sliding_window": None}) == (None, None)
    with pytest.raises(ValueError, match="not supported"):
        layer_windows({"num_hidden_layers": 1, "layer_types": ["linear_attention"]})
    with pytest.raises(ValueError, match="sliding_window is not set"):
        layer_windows({"num_hidden_layers": 1, "layer_types": ["sliding_attention"]})


def test_presets_have_the_papers_shapes():
    olmo = PRESET_SHAPES["olmo-3-7b"]
    assert olmo.layer_counts() == {4096: 24, None: 8} and olmo.windows[3] is None and olmo.windows[0] == 4096
    assert olmo.bytes_per_layer_token == 16 * 1024 and PRESETS["olmo-3-7b"] == 512 * 1024
    assert PRESETS["qwen3-8b"] == 144 * 1024 and not PRESET_SHAPES["qwen3-8b"].sliding
    assert PRESET_SHAPES["phi-4-reasoning"] == PRESET_SHAPES["phi-4"]
    assert all("config.json" in shape.source for shape in PRESET_SHAPES.values())
    cfg = {
        "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096, "sliding_window": 4096,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"] * 8,
        "dtype": "bfloat16",
    }  # fmt: skip
    shape = kv_shape(cfg)
    assert shape.windows == olmo.windows and shape.bytes_per_layer_token == olmo.bytes_per_layer_token


def test_analyse_counts_bytes_by_layer_type():
    # a long trace: 20 blocks of 300 tokens, each with a 20-token memento
    body = []
    for _ in range(20):
        body += [10] + [20] * 300 + [11, 12] + [21] * 20 + [13]
    token_ids = [1, 2, 3, *body, 22]
    full_only = KVShape("f", 1, 4, 2, (None, None))
    hybrid = KVShape("h", 1, 4, 2, (512, 512, 512, None))
    r = analyse(token_ids, 3, M, shape=full_only)
    assert r.full_bytes.peak == r.full_peak * full_only.bytes_per_token
    assert r.memento_bytes.peak == r.memento_peak * full_only.bytes_per_token
    h = analyse(token_ids, 3, M, shape=hybrid)
    assert h.full_peak == r.full_peak and h.memento_peak == r.memento_peak  # token counts: full layers
    assert h.full_bytes.peak == 16 * (r.full_peak + 3 * 512)
    assert r.peak_bytes_ratio < h.peak_bytes_ratio < 1  # windowed layers gain less
    assert analyse(token_ids, 3, M).full_bytes is None


def test_analyse_full_baseline_keeps_the_callers_gate():
    # regression (issue 12, bug 6): no assistant header, gate off -> the block is tracked and counted
    token_ids = [8, 10, 20, 20, 11, 12, 21, 13, 22]
    off = BlockMaskingConfig(require_assistant_section=False)
    assert analyse(token_ids, 1, M, off).blocks == 1
    assert analyse(token_ids, 1, M).blocks == 0


def test_paged_blocks():
    assert [paged_blocks(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_cli_olmo_preset_gains_less_than_qwen3():
    if not SHARED.exists():
        pytest.skip(f"shared data not present at {SHARED}")
    ratios = {}
    for preset in ("qwen3-8b", "olmo-3-7b"):
        result = runner.invoke(
            app, ["kv", str(SHARED / "aime25-p5-qwen3.json"), "--json", "--preset", preset]
        )
        assert result.exit_code == 0, result.output
        ratios[preset] = json.loads(result.stdout)["total"]["peak_bytes_ratio"]
    assert ratios["qwen3-8b"] < ratios["olmo-3-7b"] < 1
