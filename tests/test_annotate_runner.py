"""Sources, kill-and-resume, sharding, and the `memento annotate` CLI offline on real traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memento.annotate.runner import AnnotateConfig, load_records, run
from memento.annotate.sentences import RegexTokenCounter
from memento.annotate.sources import SourceConfig, SourceError, SourceReport, iter_traces, split_thinking
from memento.format import MementoTrace

TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / "sky-t1-aime24.jsonl"
COUNTER = RegexTokenCounter()


def _real_input(tmp_path: Path, n: int, name: str = "in.jsonl") -> Path:
    if not TRACES.exists():
        pytest.skip(f"shared real traces not found at {TRACES} (../shared/data is absent)")
    rows = [json.loads(line) for line in TRACES.read_text(encoding="utf-8").splitlines()]
    short = sorted((r for r in rows if "<|end_of_thought|>" in r["cot"]), key=lambda r: len(r["cot"]))[:n]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in short), encoding="utf-8")
    return path


def _cfg(**kw) -> AnnotateConfig:
    return AnnotateConfig(progress=False, tokenizer="regex", **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------- sources


def test_split_thinking_variants():
    assert split_thinking("<think>a b</think>\n\nAns") == ("a b", "Ans", True)
    sky = "<|begin_of_thought|>\n\nx\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\nThe answer is 5.\n\n<|end_of_solution|>"
    assert split_thinking(sky) == ("\n\nx\n\n", "The answer is 5.", True)
    assert split_thinking("<think>never closed")[2] is False
    assert split_thinking("no tags at all") == ("no tags at all", "", True)


def test_plain_reasoning_without_think_tags_is_complete(tmp_path):
    # A plain `cot` field (no tags at all) is the whole reasoning; an opening tag that is never
    # closed is a generation cut off mid-thought and is still rejected (the paper's seed filter).
    rows = [
        {"id": "plain", "problem": "P", "cot": "Reasoning with no tags. So x = 2."},
        {"id": "cut", "problem": "P", "cot": "<think>cut off mid-"},
    ]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = SourceReport()
    got = list(iter_traces(path, SourceConfig(), report))
    assert [(t.id, t.thinking, t.answer) for t in got] == [("plain", rows[0]["cot"], "")]
    assert report.to_dict()["rejected"] == {"incomplete_thinking": 1}


def test_sky_t1_acceptance_with_and_without_tags(tmp_path):
    # Tagged: the 11 traces that open <|begin_of_thought|> and never close it were cut off by the
    # token limit (no solution); the same 30 texts with every tag removed are all plain reasoning.
    if not TRACES.exists():
        pytest.skip(f"shared real traces not found at {TRACES} (../shared/data is absent)")
    rows = [json.loads(line) for line in TRACES.read_text(encoding="utf-8").splitlines()]
    report = SourceReport()
    accepted = {t.id for t in iter_traces(TRACES, SourceConfig(), report)}
    assert accepted == {r["id"] for r in rows if "<|end_of_thought|>" in r["cot"]}
    assert len(accepted) == 19 and report.to_dict()["rejected"] == {"incomplete_thinking": 11}
    tags = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")
    plain = []
    for r in rows:
        cot = r["cot"]
        for tag in tags:
            cot = cot.replace(tag, "")
        plain.append({**r, "cot": cot})
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in plain), encoding="utf-8")
    report = SourceReport()
    assert len(list(iter_traces(path, SourceConfig(), report))) == 30 and not report.rejected


def test_sources_formats_fields_and_rejections(tmp_path):
    rows = [
        {"id": "a", "prompt": "P1", "cot": "<think>fine reasoning here</think>A"},
        {
            "id": "b",
            "conversations": [
                {"from": "human", "value": "P2"},
                {"from": "gpt", "value": "<think>ok</think>B"},
            ],
        },
        {"id": "c", "problem": "P3", "cot": "<think>unfinished"},
        {"id": "d", "problem": "P4", "cot": "<think>中文推理</think>D"},
        {"id": "e", "problem": "P5"},
        {"id": "f", "problem": "P6", "cot": "<think>" + "long " * 100 + "</think>F"},
    ]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    as_json = tmp_path / "x.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [
        {"id": r["id"], "problem": r.get("problem", r.get("prompt", "")), "cot": r.get("cot")} for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "x.parquet")
    for path in (jsonl, as_json):
        report = SourceReport()
        got = list(iter_traces(path, SourceConfig(max_chars=300), report))
        assert [(t.id, t.problem, t.answer) for t in got] == [("a", "P1", "A"), ("b", "P2", "B")]
        assert report.to_dict()["rejected"] == {
            "cjk_characters": 1,
            "incomplete_thinking": 1,
            "missing_cot": 1,
            "too_long": 1,
        }
    report = SourceReport()
    assert [t.id for t in iter_traces(tmp_path / "x.parquet", SourceConfig(), report)] == ["a", "f"]
    with pytest.raises(SourceError, match="--cot-field"):
        list(iter_traces(jsonl, SourceConfig(cot_field="reasoning"), SourceReport()))
    with pytest.raises(SourceError, match="does not exist"):
        list(iter_traces(tmp_path / "missing.jsonl", SourceConfig(), SourceReport()))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        AnnotateConfig.from_dict({"backend": "heuristic", "colour": "blue"})
    with pytest.raises(ValueError, match="unknown"):
        AnnotateConfig.from_dict({"llm": {"modle": "x"}})
    assert AnnotateConfig.from_dict({"llm": {"model": "x"}}).llm.model == "x"
    with pytest.raises(ValueError, match="shard"):
        AnnotateConfig(shard_index=3, shard_count=2)


# ---------------------------------------------------------------------------------------------- runner


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    inp = _real_input(tmp_path, 5)
    out = tmp_path / "out"

    class Killed(Exception):
        pass

    seen = []

    def die_after_two(rec):
        seen.append(rec["id"])
        if len(seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        run(inp, out, _cfg(), counter=COUNTER, on_record=die_after_two)
    assert len(_lines(out / "records.jsonl")) == 2
    # A kill in the middle of the next write leaves half a line behind.
    with (out / "records.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "half-writ')
    # ... and a traces.jsonl line whose record never made it.
    with (out / "traces.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"problem": "orphan", "blocks": [], "answer": ""}) + "\n")

    summary = run(inp, out, _cfg(), counter=COUNTER)
    assert summary.skipped_done == 2 and summary.processed == 3
    records = _lines(out / "records.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 5
    traces = _lines(out / "traces.jsonl")
    assert len(traces) == 5 and all(t["problem"] != "orphan" for t in traces)
    assert {t["problem"] for t in traces} == {r["problem"] for r in records}
    # Running again does nothing.
    again = run(inp, out, _cfg(), counter=COUNTER)
    assert again.processed == 0 and again.skipped_done == 5
    assert len(load_records(out)) == 5


def test_record_contents_and_block_text_fidelity(tmp_path):
    inp = _real_input(tmp_path, 2)
    run(inp, tmp_path / "out", _cfg(), counter=COUNTER)
    for rec in _lines(tmp_path / "out" / "records.jsonl"):
        sents = rec["sentences"]
        trace = MementoTrace.from_dict(rec["trace"])
        assert len(rec["boundary_scores"]) == len(sents) - 1
        for (a, b), block in zip(rec["blocks"], trace.blocks, strict=True):
            assert block.reasoning == "".join(sents[a : b + 1]).strip()
            assert block.memento
        assert all(t >= 200 for t in rec["block_tokens"])
        assert all(0 < c <= 0.3 for c in rec["compression"])
        assert "<|begin_of_solution|>" not in trace.answer and trace.answer


def test_shards_partition_the_input(tmp_path):
    inp = _real_input(tmp_path, 5)
    ids = []
    for i in range(2):
        run(inp, tmp_path / f"s{i}", _cfg(shard_index=i, shard_count=2, workers=2), counter=COUNTER)
        ids += [r["id"] for r in _lines(tmp_path / f"s{i}" / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 5


# ---------------------------------------------------------------------------------------------- CLI


def _app():
    from memento.cli import app

    return app


def test_cli_offline_end_to_end(tmp_path):
    inp = _real_input(tmp_path, 3)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        _app(),
        ["annotate", str(inp), "--output-dir", str(out), "--tokenizer", "regex", "--no-progress", "--json"],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["processed"] == 3 and summary["failed"] == 0
    for name in ("records.jsonl", "traces.jsonl", "stats.json", "stats.md", "compression.png", "config.json"):
        assert (out / name).exists(), name
    stats = json.loads((out / "stats.json").read_text())
    assert stats["traces"] == 3 and 0.1 < stats["compression_ratio"]["median"] < 0.3
    assert "api_key" not in (out / "config.json").read_text()


def test_cli_user_errors_are_clear_and_do_not_touch_outputs(tmp_path):
    inp = _real_input(tmp_path, 1)
    out = tmp_path / "out"
    runner = CliRunner()
    ok = runner.invoke(
        _app(), ["annotate", str(inp), "-o", str(out), "--tokenizer", "regex", "--no-progress"]
    )
    assert ok.exit_code == 0, ok.output
    before = (out / "records.jsonl").read_bytes()

    missing = runner.invoke(_app(), ["annotate", str(tmp_path / "nope.jsonl"), "-o", str(out)])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    bad_field = runner.invoke(
        _app(), ["annotate", str(inp), "-o", str(out), "--cot-field", "reasoning", "--tokenizer", "regex"]
    )
    assert bad_field.exit_code != 0 and "--cot-field" in bad_field.output
    unreachable = runner.invoke(
        _app(),
        ["annotate", str(inp), "-o", str(tmp_path / "o2"), "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
         "--api-key", "none", "--tokenizer", "regex", "--no-progress"],
    )  # fmt: skip
    assert unreachable.exit_code != 0 and "cannot reach" in unreachable.output
    bad_shard = runner.invoke(_app(), ["annotate", str(inp), "-o", str(out), "--shard", "2/2"])
    assert bad_shard.exit_code != 0
    assert (out / "records.jsonl").read_bytes() == before
