"""`memento annotate` under Ctrl-C and kill -9: each finished trace is on disk as it completes
(whatever the worker count), Ctrl-C stops at once with a "rerun to resume" line, and rerunning
after either yields every accepted input exactly once (issue 19, item 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memento.annotate.runner import AnnotateConfig, offline_record, run
from memento.annotate.sentences import RegexTokenCounter
from memento.annotate.sources import RawTrace

MEMENTO = [sys.executable, "-c", "from memento.cli import app; app()"]


def _thinking(seed: int, paragraphs: int) -> str:
    """Reasoning-like text: numbered steps, checks, discourse markers (enough for several blocks)."""
    out = []
    for p in range(paragraphs):
        a, b = (seed * 7 + p) % 97, (seed * 13 + 3 * p) % 89
        out.append(
            f"Step {p}: we add {a} and {b} to get {a + b}. Then we multiply by {p + 2}, giving "
            f"{(a + b) * (p + 2)}. Wait, let me check that again: {a} + {b} is {a + b}, so the "
            f"product is {(a + b) * (p + 2)}. Alternatively we could subtract first, but that gives "
            f"{a - b}, which does not help. So the running value is {(a + b) * (p + 2)}."
        )
    return "\n\n".join(out)


def _input(tmp_path: Path, n: int, paragraphs: int = 10, big_at: int | None = None) -> Path:
    """n traces; the one at `big_at` is long enough (~80K characters, about a second) that a
    signal sent right after the traces before it are written lands while it is in progress."""
    path = tmp_path / "in.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            cot = f"<think>{_thinking(i, 300 if i == big_at else paragraphs)}</think>The answer is {i}."
            f.write(json.dumps({"id": f"t{i:03d}", "problem": f"Problem {i}", "cot": cot}) + "\n")
    return path


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _start(inp: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [*MEMENTO, "annotate", str(inp), "-o", str(out), "--tokenizer", "regex", "--no-progress", *extra]
    # A job started in the background inherits SIGINT ignored (and Python then never raises
    # KeyboardInterrupt): give the child the default so the test's Ctrl-C reaches it wherever pytest runs.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )


def _wait_for_records(proc: subprocess.Popen, records: Path, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"annotate ended before it was interrupted: {proc.communicate()}")
        if records.exists():
            n = len(_ids(records)) if records.read_bytes().endswith(b"\n") else 0
            if n >= at_least:
                return n
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {at_least} record(s) in {timeout} s")


@pytest.mark.parametrize("workers", [1, 2])
def test_each_trace_is_on_disk_when_it_is_reported(tmp_path, workers):
    inp = _input(tmp_path, 6)
    out = tmp_path / "out"
    seen: list[str] = []

    def check(rec: dict) -> None:  # called right after the write: the line must already be there
        seen.append(rec["id"])
        assert _ids(out / "records.jsonl") == seen

    cfg = AnnotateConfig(progress=False, tokenizer="regex", workers=workers)
    summary = run(inp, out, cfg, counter=RegexTokenCounter(), on_record=check)
    assert summary.processed == 6 and sorted(seen) == [f"t{i:03d}" for i in range(6)]


def test_ctrl_c_stops_at_once_and_the_rerun_completes_exactly_once(tmp_path):
    inp = _input(tmp_path, 30, big_at=2)
    out = tmp_path / "out"
    proc = _start(inp, out)  # default settings: one worker
    _wait_for_records(proc, out / "records.jsonl", at_least=2)
    proc.send_signal(signal.SIGINT)  # while t002 (the long one) is in progress
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("Ctrl-C did not stop memento annotate within 30 s")
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    # stopped inside the long trace, not after it (or after the whole run)
    assert _ids(out / "records.jsonl") == ["t000", "t001"]

    again = _start(inp, out, "--json")
    stdout, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summary = json.loads(stdout)
    assert summary["already_done"] == 2 and summary["processed"] == 28
    assert sorted(_ids(out / "records.jsonl")) == [f"t{i:03d}" for i in range(30)]
    assert len((out / "traces.jsonl").read_text(encoding="utf-8").splitlines()) == 30


def test_kill_9_loses_at_most_the_trace_in_flight(tmp_path):
    inp = _input(tmp_path, 30, big_at=3)
    out = tmp_path / "out"
    proc = _start(inp, out)
    _wait_for_records(proc, out / "records.jsonl", at_least=3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    kept = _ids(out / "records.jsonl")
    assert kept == ["t000", "t001", "t002"]  # all finished traces survived; t003 was in flight

    again = _start(inp, out, "--json")
    stdout, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert sorted(_ids(out / "records.jsonl")) == [f"t{i:03d}" for i in range(30)]  # each exactly once
    assert json.loads(stdout)["already_done"] == 3


def test_long_trace_reports_its_steps():
    stages: list[str] = []
    raw = RawTrace("big", "p", _thinking(1, 60), "a", 0)
    cfg = AnnotateConfig(progress=False, tokenizer="regex")
    rec = offline_record(raw, cfg, RegexTokenCounter(), stages.append)
    assert rec["id"] == "big"
    assert [s.split()[0] for s in stages] == ["splitting", "segmenting", "writing"]
    assert f"segmenting {len(rec['sentences']):,} sentences" in stages
