"""`memento eval --row ...`: the paper's Table 1 (rows Base / Control / MEMENTO / +RL, benchmark
columns with a Comp. Math mean, Δ vs Control, peak KV in GB, AUC in GB·ktok) from eval folders."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.eval.table import build_table, parse_row
from memento.format import Block, MementoTrace

BENCHES = {
    "aime24": [("a1", "5"), ("a2", "7")],
    "aime25": [("b1", "11"), ("b2", "13")],
    "math500": [("m1", "2"), ("m2", "3")],
}


def _response(answer: str, blocks: int) -> str:
    trace = MementoTrace(
        "q", tuple(Block(f"step {i} " * 12, f"s{i}") for i in range(blocks)), f"\\boxed{{{answer}}}"
    )
    return trace.render()


def _eval(tmp_path, toy_model_dir, row: str, mode: str, right: dict[str, int], blocks: int) -> None:
    """One eval folder per benchmark for `row`: `right[bench]` of its 2 problems answered right."""
    for bench, problems in BENCHES.items():
        path = tmp_path / f"{bench}.jsonl"
        path.write_text(
            "".join(json.dumps({"id": i, "problem": f"p {i}", "answer": a}) + "\n" for i, a in problems)
        )
        resp = tmp_path / f"{row}-{bench}-responses.jsonl"
        lines = []
        for k, (pid, ans) in enumerate(problems):
            for s in range(2):
                given = ans if k < right[bench] else "999"
                lines.append(
                    json.dumps({"id": pid, "sample": s, "mode": mode, "response": _response(given, blocks)})
                )
        resp.write_text("\n".join(lines) + "\n")
        out = tmp_path / row / bench
        args = ["eval", str(path), "--responses", str(resp), "--tokenizer", str(toy_model_dir),
                "--kv-preset", "qwen3-8b", "-o", str(out), "--no-plots", "--json"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output


@pytest.fixture()
def folders(tmp_path, toy_model_dir):
    _eval(tmp_path, toy_model_dir, "base", "full", {"aime24": 2, "aime25": 2, "math500": 2}, 3)
    _eval(tmp_path, toy_model_dir, "control", "full", {"aime24": 1, "aime25": 2, "math500": 2}, 3)
    _eval(tmp_path, toy_model_dir, "memento", "memento", {"aime24": 1, "aime25": 1, "math500": 2}, 3)
    return tmp_path


def test_table1_rows_columns_deltas(folders):
    out = folders / "table"
    args = [
        "eval", "--row", f"Base={folders}/base/*", "--row", f"Control={folders}/control/*",
        "--row", f"MEMENTO={folders}/memento/*@memento", "--row", f"+RL={folders}/memento/*",
        "-o", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table1.json").read_text())
    assert table["rows"] == ["Base", "Control", "MEMENTO", "+RL"] and table["reference"] == "Control"
    assert table["columns"] == ["aime24", "aime25", "Comp. Math", "math500"]
    cells = table["cells"]
    assert cells["Control"]["aime24"]["acc"] == 50.0 and cells["Control"]["Comp. Math"]["acc"] == 75.0
    assert cells["MEMENTO"]["Comp. Math"]["acc"] == 50.0
    # same responses in both modes: MEMENTO's evictions lower peak and AUC against the full replay
    assert cells["MEMENTO"]["math500"]["peak_kv_gb"] < cells["Control"]["math500"]["peak_kv_gb"]
    ratio = cells["MEMENTO"]["math500"]["peak_kv_gb"] / cells["Control"]["math500"]["peak_kv_gb"]
    md = (out / "table1.md").read_text()
    assert "| Comp. Math | Δ |" in md and "AUC KV (GB·ktok)" in md
    memento_acc = next(line for line in md.splitlines() if line.startswith("| MEMENTO | Acc"))
    assert "50.0 | -25.0" in memento_acc  # Comp. Math: 50 vs Control's 75
    memento_peak = next(line for line in md.splitlines() if "| Peak KV (GB)" in line and "×" in line)
    assert f"{ratio:.2f}×" in memento_peak
    base_acc = next(line for line in md.splitlines() if line.startswith("| Base | Acc"))
    assert "+" not in base_acc and "×" not in base_acc  # rows above the reference get no Δ


def test_table1_user_errors(folders, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--row", "nolabel", "-o", str(tmp_path / "t")])
    assert result.exit_code == 2 and "LABEL=DIR" in result.output
    result = CliRunner().invoke(app, ["eval", "--row", f"A={tmp_path}/nothing-*", "-o", str(tmp_path / "t")])
    assert result.exit_code == 2 and "matches no folder" in result.output
    result = CliRunner().invoke(
        app, ["eval", "--row", f"A={folders}/base/*@memento", "-o", str(tmp_path / "t")]
    )
    assert result.exit_code == 2 and "no run 'memento'" in result.output
    result = CliRunner().invoke(
        app,
        ["eval", str(folders / "aime24.jsonl"), "--row", f"A={folders}/base/*", "-o", str(tmp_path / "t")],
    )
    assert result.exit_code == 2 and "drop the benchmark file" in result.output
    result = CliRunner().invoke(
        app, ["eval", "--row", f"A={folders}/base/*", "--n", "3", "-o", str(tmp_path / "t")]
    )
    assert result.exit_code == 2 and "--n does not apply" in result.output
    result = CliRunner().invoke(
        app, ["eval", "--row", f"A={folders}/base/*", "--reference", "Z", "-o", str(tmp_path / "t")]
    )
    assert result.exit_code == 2 and "not a row label" in result.output
    assert not (tmp_path / "t").exists()


def test_groups_need_all_members_and_rows_are_unique(folders):
    rows = [parse_row(f"A={folders}/base/aime24"), parse_row(f"B={folders}/control/*")]
    table = build_table(rows, groups=[("Comp", ["aime24", "aime25"])])
    assert "Comp" not in table["cells"]["A"] and table["cells"]["B"]["Comp"]["acc"] == 75.0
    assert table["reference"] == "A"  # no Control row: the first row
    with pytest.raises(ValueError, match="twice"):
        build_table([rows[0], rows[0]])
    with pytest.raises(ValueError, match="both"):
        build_table([parse_row(f"A={folders}/base/aime24,{folders}/control/aime24")])
