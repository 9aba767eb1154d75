"""The serving benchmark's own code (benchmarks/serving_workload.py, serving_bench.py): the workload
has the structure it claims, the marker-free variant evicts nothing, ratios pair the repetitions
that ran back to back, and one engine worker runs end to end on the toy model. No timing here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memento.masking import BlockMaskingConfig, evictions

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import serving_bench  # noqa: E402
import serving_workload  # noqa: E402

needs_shared = pytest.mark.skipif(
    not (serving_workload.MEMENTO_OUTPUTS.is_dir() and serving_workload.SKY_T1.is_file()),
    reason=f"real traces not found under {serving_workload.SHARED} (../shared/data is absent)",
)
SHAPES = serving_workload.TraceShapes(pairs=[(160, 32), (320, 16)], answers=[48], cot_lengths=[400, 4000])


def _spans(out: list[int], start: int, end: int) -> list[int]:
    """Lengths of the token runs between each `start` and the next `end`."""
    lengths, at = [], None
    for i, t in enumerate(out):
        if t == start:
            at = i
        elif t == end and at is not None:
            lengths.append(i - at - 1)
            at = None
    return lengths


def test_workload_follows_the_trace_shapes(toy_tokenizer, markers):
    work = serving_workload.build(toy_tokenizer, requests=12, token_scale=16, block_scale=2, shapes=SHAPES)
    again = serving_workload.build(toy_tokenizer, requests=12, token_scale=16, block_scale=2, shapes=SHAPES)
    assert (work.prompts, work.outputs) == (again.prompts, again.outputs)  # every process builds the same
    assert set(work.blocks) == {1, 8}  # round(400 / 264 / 2), round(4000 / 264 / 2): mean pair 264
    for prompt, out, n_blocks in zip(work.prompts, work.outputs, work.blocks, strict=True):
        blocks = _spans(out, markers.block_start, markers.block_end)
        mementos = _spans(out, markers.summary_start, markers.summary_end)
        assert list(zip(blocks, mementos, strict=True)) == [(10, 2) if b == 10 else (20, 1) for b in blocks]
        assert len(blocks) == n_blocks
        assert len(evictions(prompt + out, markers, BlockMaskingConfig())) == n_blocks  # keep 0
        assert len(out) == 1 + sum(4 + b + m for b, m in zip(blocks, mementos, strict=True)) + 1 + 3


@needs_shared
def test_workload_from_the_real_traces(toy_tokenizer):
    shapes = serving_workload.load_shapes()
    assert len(shapes.pairs) >= 10 and len(shapes.answers) == 3 and len(shapes.cot_lengths) == 30
    work = serving_workload.build(toy_tokenizer, requests=20, shapes=shapes)
    assert work.summary()["requests"] == 20
    assert serving_workload.kv_profile(work, toy_tokenizer)["peak_ratio"] > 1.5  # eviction lowers the peak


def test_marker_free_streams_keep_lengths_and_evict_nothing(toy_tokenizer, markers, monkeypatch):
    monkeypatch.setattr(serving_workload, "load_shapes", lambda *a, **k: SHAPES)
    cfg = {"requests": 6, "token_scale": 16, "block_scale": 1, "seed": 3, "no_markers": True}
    original = serving_workload.build(toy_tokenizer, requests=6, block_scale=1, seed=3)
    prompts, outputs = serving_bench.streams(cfg, toy_tokenizer)
    assert [len(o) for o in outputs] == [len(o) for o in original.outputs]
    for prompt, out in zip(prompts, outputs, strict=True):
        assert not set(out) & set(markers.block_markers)
        assert evictions(prompt + out, markers, BlockMaskingConfig()) == []


def _row(system: str, rep: int, tok_s: float) -> dict:
    return {
        "system": system, "variant": "fig8", "concurrency": 4, "rep": rep, "inner": 0, "tokens_per_s": tok_s,
        "seconds": 100 / tok_s, "tokens_per_cpu_s": tok_s, "ms_per_step": 1.0, "mean_batch": 2.0,
        "preemptions": 0, "peak_kv_tokens": 64, "steps": 50, "load_before": 1.0,
    }  # fmt: skip


def test_ratios_pair_the_repetitions_that_ran_back_to_back():
    rows = [_row("engine-full", 0, 100), _row("engine-memento", 0, 150)]
    rows += [_row("engine-full", 1, 50), _row("engine-memento", 1, 100)]
    rows += [_row("engine-full", 2, 80), _row("engine-memento", 2, 96)]
    (line,) = serving_bench.summarise(rows)
    ratio = line["ratios"]["engine-memento"]["throughput"]
    assert ratio["all"] == [1.5, 2.0, 1.2]  # per repetition, not median / median (= 1.2)
    assert (ratio["median"], ratio["min"], ratio["max"]) == (1.5, 1.2, 2.0)
    assert line["systems"]["engine-full"]["tokens_per_s"]["median"] == 80


def test_engine_worker_runs_both_modes_on_the_workload(toy_model_dir, toy_tokenizer, monkeypatch):
    import torch

    monkeypatch.setattr(serving_workload, "load_shapes", lambda *a, **k: SHAPES)
    cfg = {
        "systems": ["engine-full", "engine-memento"], "rep": 1, "inner": 1,
        "points": [{"variant": "fig8", "concurrency": 2, "keep": 0}], "model_dir": str(toy_model_dir),
        "requests": 3, "token_scale": 16, "block_scale": 2, "seed": 0, "pool_tokens": 512,
    }  # fmt: skip
    threads = torch.get_num_threads()
    try:
        rows = serving_bench.worker(cfg)
    finally:
        torch.set_num_threads(threads)
    work = serving_workload.build(toy_tokenizer, requests=3, block_scale=2)
    assert [r["system"] for r in rows] == ["engine-memento", "engine-full"]  # rotated by the repetition
    by_system = {r["system"]: r for r in rows}
    for row in rows:
        assert row["output_tokens"] == sum(len(o) for o in work.outputs)
        assert 0 < row["peak_kv_tokens"] <= 512 and row["kv_allocated_bytes"] > 0
    assert by_system["engine-memento"]["evictions"] == sum(work.blocks)
    assert by_system["engine-full"]["evictions"] == 0


def test_report_tables_show_every_pair_and_the_load():
    import serving_report

    rows = [_row("vllm-vanilla", 0, 100), _row("vllm-memento", 0, 150)]
    rows += [_row("vllm-vanilla", 1, 50), _row("vllm-memento", 1, 100)]
    result = {
        "command": "python benchmarks/serving_bench.py --reps 2",
        "workload": {"requests": 2, "output_tokens": 200, "output_tokens_min_max": [90, 110], "blocks_mean": 3},
        "args": {"pool_tokens": 768, "reps": 2, "inner": 1},
        "wall_seconds": 60.0, "load_average_start": [7.5], "load_average_end": [8.5], "cpu_cores": 2,
        "runs": rows, "table": serving_bench.summarise(rows),
    }  # fmt: skip
    ratios = serving_report.ratios_table(result, ("vllm-memento",))
    assert "**1.75×** [1.50–2.00] (1.50, 2.00)" in ratios  # median, range, every pair
    assert "load average 7.5 at the start, 8.5 at the end" in serving_report.header(result)
    assert (
        serving_report.systems_table(result, ("vllm-vanilla", "vllm-memento")).count("\n") == 1 + 2
    )  # header, rule, one row per system


def test_each_memento_system_shares_its_process_with_its_baseline():
    groups = serving_bench.process_groups(["vllm-memento", "engine-full", "vllm-vanilla", "engine-memento"])
    assert groups == [["engine-full", "engine-memento"], ["vllm-memento", "vllm-vanilla"]]
    assert serving_bench.process_groups(["vllm-vanilla"]) == [["vllm-vanilla"]]
