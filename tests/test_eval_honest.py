"""`memento eval` never reports wrong numbers without a word (issue 19, items 2, 3, 7, 14):
same-named response files get their own columns, reruns after fixing the inputs regrade, a typo
never leaves a run_config.json that blocks its own correction, --limit means what it says."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from memento.cli import app

PROBLEMS = [
    {"id": "a", "problem": "Add 2 and 3.", "answer": "5"},
    {"id": "b", "problem": "Add 4 and 4.", "answer": "8"},
]
runner = CliRunner()


def _bench(tmp_path: Path) -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def _responses(path: Path, answers: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"id": pid, "response": f"so the answer is \\boxed{{{a}}}"} for pid, a in answers.items()]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _eval(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, ["eval", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_same_file_names_get_their_own_columns(tmp_path):
    bench = _bench(tmp_path)
    a = _responses(tmp_path / "runA" / "responses.jsonl", {"a": "5", "b": "8"})
    b = _responses(tmp_path / "runB" / "responses.jsonl", {"a": "1", "b": "1"})
    code, out, err = _eval(bench, "--responses", a, "--responses", b, "-o", tmp_path / "o", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["order"] == ["runA/responses", "runB/responses"]
    assert summary["runs"]["runA/responses"]["pass@1"] == 1.0
    assert summary["runs"]["runB/responses"]["pass@1"] == 0.0


def test_the_same_answer_in_two_files_is_refused_not_dropped(tmp_path):
    bench = _bench(tmp_path)
    lines = json.dumps({"id": "a", "response": "5", "mode": "m"}) + "\n"
    (tmp_path / "x.jsonl").write_text(lines)
    (tmp_path / "y.jsonl").write_text(lines)
    args = ["--responses", tmp_path / "x.jsonl", "--responses", tmp_path / "y.jsonl", "-o", tmp_path / "o"]
    code, out, err = _eval(bench, *args)
    assert code == 2 and "y.jsonl:1" in err and "x.jsonl:1" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_rerun_after_fixing_the_responses_regrades(tmp_path):
    bench = _bench(tmp_path)
    out = tmp_path / "o"
    resp = _responses(tmp_path / "resp.jsonl", {"a": "4", "b": "7"})
    code, first, err = _eval(bench, "--responses", resp, "-o", out, "--json")
    assert code == 0, err
    assert json.loads(first)["runs"]["resp"]["pass@1"] == 0.0
    _responses(resp, {"a": "5", "b": "8"})  # fixed
    code, second, err = _eval(bench, "--responses", resp, "-o", out, "--json")
    assert code == 0, err
    assert json.loads(second)["runs"]["resp"]["pass@1"] == 1.0
    assert "0/0" not in err
    _responses(resp, {"a": "5"})  # a line removed: its old grade must not stay in the report
    code, third, err = _eval(bench, "--responses", resp, "-o", out, "--json")
    summary = json.loads(third)
    assert summary["runs"]["resp"]["problems"] == 1 and summary["runs"]["resp"]["samples"] == 1
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a"]
    assert "1 of 2 problems graded" in (out / "report.md").read_text()  # the header counts what was graded


def test_rerun_with_a_tokenizer_adds_the_kv_numbers(tmp_path, toy_model_dir):
    bench = _bench(tmp_path)
    out = tmp_path / "o"
    resp = _responses(tmp_path / "resp.jsonl", {"a": "5", "b": "8"})
    code, first, err = _eval(bench, "--responses", resp, "-o", out, "--json")
    assert code == 0 and json.loads(first)["runs"]["resp"]["peak_kv"] is None
    code, second, err = _eval(bench, "--responses", resp, "-o", out, "--json", "--tokenizer", toy_model_dir)
    assert code == 0, err
    assert json.loads(second)["runs"]["resp"]["peak_kv"] > 0


def test_a_typo_does_not_block_its_correction(tmp_path, toy_model_dir):
    bench = _bench(tmp_path)
    out = tmp_path / "o"
    for typo in (["--model", "/nope"], ["--model", str(toy_model_dir), "--batch-size", "-1"],
                 ["--model", str(toy_model_dir), "--dtype", "bogus"], ["--model", str(tmp_path)]):  # fmt: skip
        code, _, err = _eval(bench, *typo, "-o", out, "--max-new-tokens", "4")
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
        assert not out.exists(), typo
    # a run_config.json left by a run that wrote no result (an older version did) blocks nothing
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "/nope"}))
    code, stdout, err = _eval(bench, "--model", toy_model_dir, "-o", out, "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads((out / "run_config.json").read_text())["model"] == str(Path(toy_model_dir).resolve())


def test_limit_grades_exactly_that_many(tmp_path):
    bench = _bench(tmp_path)
    resp = _responses(tmp_path / "resp.jsonl", {"a": "5"})
    code, out, err = _eval(bench, "--responses", resp, "-o", tmp_path / "o", "--limit", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["problems"] == 1
    for bad in ("0", "-1"):
        code, _, err = _eval(bench, "--responses", resp, "-o", tmp_path / "o2", "--limit", bad)
        assert code == 2 and "--limit must be >= 1" in err
