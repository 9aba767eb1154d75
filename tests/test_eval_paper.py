"""`memento eval` with the paper's settings (App. A.2.2): samples per benchmark, 32,000 new tokens,
eviction options for --model, and KV GB counted per layer type (sliding-window layers hold at most
their window)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.eval.report import sample_kv_bytes
from memento.eval.runner import GenerationConfig, default_samples, window_traces
from memento.format import Block, MementoTrace
from memento.kv import KVShape, analyse, compress_steps, compress_trace, expand_steps, kv_stats
from memento.masking import BlockMaskingConfig

PROBLEMS = [
    {"id": "a", "problem": "Add 2 and 3.", "answer": "5"},
    {"id": "b", "problem": "Add 4 and 4.", "answer": "8"},
]


def test_samples_per_benchmark_and_token_budget_are_the_papers():
    for name in ("aime24", "AIME_2025", "hmmt_feb_2025", "amc23", "brumo25"):
        assert default_samples(name) == 64, name
    for name in ("math500", "gpqa-diamond", "livecodebench_v6", "toy"):
        assert default_samples(name) == 2, name
    config = GenerationConfig(model="m")
    assert (config.max_new_tokens, config.temperature, config.top_p, config.top_k) == (32000, 0.6, 0.95, 20)
    assert "masking" not in config.fingerprint()  # unchanged for runs made before the option
    masked = GenerationConfig(model="m", masking={"keep_last_n_blocks": 1})
    assert masked.masking_config == BlockMaskingConfig(keep_last_n_blocks=1)
    assert masked.fingerprint()["masking"] == {"keep_last_n_blocks": 1}


def _trace_ids(toy_tokenizer):
    trace = MementoTrace(
        "q", (Block("a b c d e f g h", "s t"), Block("i j k l m n", "u"), Block("o p q", "v w")), "x y"
    )
    prompt = toy_tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False
    )
    p_ids = toy_tokenizer.encode(prompt)
    return p_ids + toy_tokenizer.encode(trace.render()), len(p_ids)


def test_sample_bytes_by_layer_type_equal_memento_kv(toy_tokenizer, markers):
    # 3 sliding layers of window 6 + 1 full layer: the record's traces give the same peak and AUC
    # bytes as memento.kv.analyse (what `memento kv` reports) for the same token stream.
    shape = KVShape("mixed", 2, 4, 2, (6, 6, 6, None))
    ids, prompt_len = _trace_ids(toy_tokenizer)
    config = BlockMaskingConfig()
    full = kv_stats(ids, markers, config, prompt_len)
    record = {
        "peak_kv": full.peak,
        "auc_kv": full.auc,
        "kv_runs": compress_trace(full.trace),
        "kv_runs_window": {
            str(w): compress_steps(t) for w, t in window_traces(ids, prompt_len, markers, config, [6]).items()
        },
    }
    expected = analyse(ids, prompt_len, markers, config, shape).memento_bytes
    assert sample_kv_bytes(record, shape) == (expected.peak, expected.auc)
    assert expected.peak < full.peak * shape.bytes_per_token  # window layers hold less
    # without the window traces a sliding shape cannot be counted by type
    assert sample_kv_bytes({k: v for k, v in record.items() if k != "kv_runs_window"}, shape) is None
    # an all-full shape is exact from the token counts
    dense = KVShape("dense", 2, 4, 2, (None,) * 4)
    assert sample_kv_bytes(record, dense) == (
        full.peak * dense.bytes_per_token,
        full.auc * dense.bytes_per_token,
    )


def _sliding_config(tmp_path, window: int):
    cfg = {
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "torch_dtype": "bfloat16",
        "sliding_window": window,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    }
    path = tmp_path / "sliding.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_eval_model_default_n_masking_options_and_gb_by_layer_type(tmp_path, toy_model_dir):
    bench = tmp_path / "toy.jsonl"
    bench.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = tmp_path / "out"
    args = [
        "eval", str(bench), "--model", str(toy_model_dir), "--mode", "full", "--mode", "memento",
        "--max-new-tokens", "10", "--keep-last-n-blocks", "1", "--model-config", str(_sliding_config(tmp_path, 4)),
        "--output-dir", str(out), "--json", "--no-plots",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "--n 2" in result.output  # not competition math: the paper's 2 samples
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2
    assert json.loads((out / "run_config.json").read_text())["masking"] == {"keep_last_n_blocks": 1}
    for r in records:
        full_trace = [s + i for s, n in r["kv_runs"] for i in range(n)]
        window = expand_steps(r["kv_runs_window"]["4"])
        assert len(window) == len(full_trace) and max(window) <= 4
        if r["mode"] == "full":  # nothing evicted: a window layer holds min(cached, 4)
            assert window == [min(t, 4) for t in full_trace]
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["full"]
    assert run["kv_gb_basis"] == "by layer type" and run["kv_gb_full_fallback"] == 0
    per_layer_token = 2 * 2 * 8 * 2
    # 3 window layers hold at most 4 tokens: far less than 4 full layers at the same peak
    assert run["peak_kv_gb"] < run["peak_kv"] * 4 * per_layer_token / 1e9
    assert "AUC KV (GB·ktok)" in (out / "report.md").read_text()


def test_eval_masking_flags_refused_where_they_do_nothing(tmp_path, toy_model_dir):
    bench = tmp_path / "toy.jsonl"
    bench.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"id": "a", "response": "5"}) + "\n")
    cases = [
        (["--model", str(toy_model_dir), "--mode", "full", "--keep-last-n-blocks", "1"], "--mode full"),
        (["--responses", str(resp), "--mask-delimiters"], "--tokenizer"),
        (["--model", str(toy_model_dir), "--masking-config", '{"keep_last": 1}'], "unknown block-masking"),
        (["--model", str(toy_model_dir), "--n", "0"], "--n"),
    ]
    for extra, message in cases:
        out = tmp_path / "never"
        result = CliRunner().invoke(app, ["eval", str(bench), *extra, "-o", str(out)])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert not out.exists()


def test_responses_replay_counts_gb_by_layer_type(tmp_path, toy_model_dir, toy_tokenizer, markers):
    # --responses with a tokenizer: the KV replay records the window traces too, and the summary's
    # peak GB is memento.kv.analyse's bytes for the same tokens (3 layers of window 6 + 1 full).
    trace = MementoTrace("q", (Block("a b c d e f g h", "s t"), Block("i j k l m n", "u")), "x")
    bench = tmp_path / "toy.jsonl"
    bench.write_text(json.dumps({"id": "a", "problem": "q", "answer": "5"}) + "\n")
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"id": "a", "mode": "memento", "response": trace.render()}) + "\n")
    config = _sliding_config(tmp_path, 6)
    out = tmp_path / "out"
    args = ["eval", str(bench), "--responses", str(resp), "--tokenizer", str(toy_model_dir),
            "--model-config", str(config), "-o", str(out), "--no-plots", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text())
    assert set(record["kv_runs_window"]) == {"6"}
    prompt = toy_tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False
    )
    p_ids = toy_tokenizer.encode(prompt)
    ids = p_ids + toy_tokenizer.encode(trace.render())
    from memento.kv import kv_shape

    expected = analyse(ids, len(p_ids), markers, BlockMaskingConfig(), kv_shape(config)).memento_bytes
    run = json.loads((out / "summary.json").read_text())["runs"]["memento"]
    assert run["kv_gb_basis"] == "by layer type"
    assert run["peak_kv_gb"] == pytest.approx(expected.peak / 1e9)
    assert run["auc_kv_gb_ktok"] == pytest.approx(expected.auc / 1e12)
