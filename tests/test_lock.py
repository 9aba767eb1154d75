"""The repo's .venv holds exactly the locked set (what scripts/setup.sh promises)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lock(name: str) -> list[str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return sorted((line for line in lines if line and not line.startswith("#")), key=str.lower)


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="only the repo's .venv is installed from requirements/main.txt (this is another environment)",
)
def test_venv_matches_lock():
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    have = sorted((p for p in freeze if not p.lower().startswith("memento")), key=str.lower)
    assert have == _lock("main.txt")


@pytest.mark.parametrize("name", ["main.txt", "vllm.txt"])
def test_lock_pins_every_line(name):
    """Only exact pins: a range or a bare name would install whatever the registry serves today."""
    for line in _lock(name):
        assert "==" in line and not any(c in line for c in "<>~*;@ "), f"{name}: {line!r} is not an exact pin"
