"""memento.user_errors: the one-line error, the Ctrl-C line with how to resume, and the shared
argument checks every command uses before it loads a model or writes anything (issue 19)."""

from __future__ import annotations

import json

import pytest
import typer

from memento.user_errors import (
    UsageError,
    check_count,
    check_device,
    check_dtype,
    check_input_file,
    check_model_dir,
    check_output_dir,
    reported,
)


def test_errors_are_one_line_exit_2(capsys):
    with pytest.raises(typer.Exit) as exit_info, reported("x"):
        raise ValueError("first part\n   second part")
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err == "error: first part second part\n"


def test_ctrl_c_says_how_to_resume_exit_130(capsys):
    with pytest.raises(typer.Exit) as exit_info, reported("eval", resume="rerun the same command to resume"):
        raise KeyboardInterrupt
    assert exit_info.value.exit_code == 130
    assert capsys.readouterr().err.strip() == "memento eval: interrupted; rerun the same command to resume"


def test_other_exceptions_are_not_swallowed():
    with pytest.raises(ZeroDivisionError), reported("x"):  # a bug must stay visible, not become "error:"
        raise ZeroDivisionError


def test_model_dir_checks(tmp_path, toy_model_dir):
    assert check_model_dir(toy_model_dir) == toy_model_dir
    cases = {
        "Qwen/Qwen3-0.6B": "downloads nothing",
        str(tmp_path / "nope"): "no such directory",
        str(tmp_path): "no config.json",
    }
    (tmp_path / "f").write_text("x")
    cases[str(tmp_path / "f")] = "is a file"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    cases[str(bad)] = "not a readable JSON model config"
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    cases[str(notok)] = "no tokenizer files"
    for path, fragment in cases.items():
        with pytest.raises(UsageError, match=fragment):
            check_model_dir(path)


def test_argument_checks(tmp_path):
    check_count(None, "--n")
    check_count(1, "--n")
    with pytest.raises(UsageError, match="--n must be >= 1, got 0"):
        check_count(0, "--n")
    assert check_dtype("bfloat16") == "bfloat16"
    with pytest.raises(UsageError, match="--dtype 'fp64'"):
        check_dtype("fp64")
    assert check_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="not a device|unsupported"):
        check_device("toaster")
    (tmp_path / "f").write_text("x")
    (tmp_path / "empty").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(UsageError, match="is a file"):
        check_output_dir(tmp_path / "f" / "below")
    assert check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    with pytest.raises(UsageError, match="the file is empty"):
        check_input_file(tmp_path / "empty", "--data")
    with pytest.raises(UsageError, match="is a directory"):
        check_input_file(tmp_path, "--data")
