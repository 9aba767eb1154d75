"""MEMENTO_CPU_NUMERICS=avx2: AVX2 kernels on any x86-64 CPU (memento.cpu_numerics)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from memento import cli, cpu_numerics
from memento.cpu_numerics import PINNED, SWITCH, pin_cpu_numerics


@pytest.fixture
def has_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_numerics, "_x86_with_avx2", lambda: True)


def test_pins_every_variable_when_asked(has_avx2: None) -> None:
    env = {SWITCH: "AVX2"}
    assert pin_cpu_numerics(env)
    assert env == {SWITCH: "AVX2", **PINNED}


@pytest.mark.parametrize("env", [{}, {SWITCH: "native"}, {SWITCH: ""}])
def test_native_kernels_by_default(has_avx2: None, env: dict[str, str]) -> None:
    before = dict(env)
    assert not pin_cpu_numerics(env)
    assert env == before


def test_leaves_what_the_user_set(has_avx2: None) -> None:
    env = {SWITCH: "avx2", "MKL_CBWR": "COMPATIBLE"}
    assert pin_cpu_numerics(env)
    assert env["MKL_CBWR"] == "COMPATIBLE"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"


def test_avx2_off_x86_is_an_error_not_native_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_numerics.platform, "machine", lambda: "arm64")
    env = {SWITCH: "avx2"}
    with pytest.raises(ValueError, match="arm64"):
        pin_cpu_numerics(env)
    assert env == {SWITCH: "avx2"}
    assert not pin_cpu_numerics({SWITCH: "native"})


def test_a_typo_is_an_error_not_native_numbers(has_avx2: None) -> None:
    with pytest.raises(ValueError, match=SWITCH):
        pin_cpu_numerics({SWITCH: "avx-2"})


@pytest.mark.skipif(not cpu_numerics._x86_with_avx2(), reason="needs an x86-64 CPU with AVX2")
def test_torch_computes_with_the_pinned_kernels() -> None:
    """In a fresh process (the variables are read once): avx2 -> AVX2 kernels, default -> the CPU's."""
    code = (
        "from memento.cpu_numerics import pin_cpu_numerics, cpu_kernels; "
        "pin_cpu_numerics(); import torch; torch.ones(8).softmax(0); print(cpu_kernels())"
    )
    env = {k: v for k, v in os.environ.items() if k not in PINNED and k != SWITCH}

    def kernels(extra: dict[str, str]) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert kernels({SWITCH: "avx2"}) == "AVX2 (MKL_CBWR=AVX2)"
    assert "MKL_CBWR" not in kernels({})


def test_cli_pins_before_the_command_and_rejects_a_typo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_numerics, "_x86_with_avx2", lambda: True)
    for name in PINNED:  # set, then delete: monkeypatch then removes what the CLI sets at teardown
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv(SWITCH, "avx2")
    assert CliRunner().invoke(cli.app, ["train", "--help"]).exit_code == 0
    assert all(os.environ[name] == value for name, value in PINNED.items())

    monkeypatch.setenv(SWITCH, "avx512")
    result = CliRunner().invoke(cli.app, ["train", "--help"])
    assert result.exit_code == 2
    assert f"error: {SWITCH}='avx512'" in result.output
    assert "Traceback" not in result.output
