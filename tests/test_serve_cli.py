"""`memento serve` as a command: bad arguments are one line and exit 2 before anything loads; the
real command binds 127.0.0.1 (port 0 = a free one), answers /health 200 once the model is loaded,
serves a request, and stops cleanly on Ctrl-C (exit 130, one line)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from memento.cli import app


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mode", "fast"], "--mode must be one of"),
        (["--dtype", "int8"], "--dtype 'int8'"),
        (["--kv-budget-tokens", "1"], "--kv-budget-tokens must be >= 2"),
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--api-key", " "], "--api-key must not be empty"),
        (["--memento-config", "{bad"], "--memento-config: not valid JSON"),
        (["--memento-config", "[1]"], "expected a JSON object"),
        (["--memento-config", '{"keep": 1}'], "unknown block-masking option"),
        (["--memento-config", '{"restart_mode": true}'], "needs --mode restart"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(toy_model_dir, args, message):
    result = CliRunner().invoke(app, ["serve", str(toy_model_dir), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_missing_model_and_busy_port(tmp_path, toy_model_dir):
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no config.json" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(toy_model_dir), "--port", str(port)])
    assert result.exit_code == 2 and "address already in use" in result.stderr


@pytest.mark.slow
def test_serve_command_end_to_end(toy_model_dir):
    env = {**os.environ, "MEMENTO_API_KEY": "k"}
    memento = str(Path(sys.executable).parent / "memento")  # the console script of this venv
    cmd = [memento, "serve", str(toy_model_dir), "--port", "0", "--threads", "1"]
    cmd += ["--kv-budget-tokens", "300", "--served-model-name", "toy", "--log-level", "warning"]
    # SIGINT at its default in the child even when pytest runs as a background job (which ignores it)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(2)}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not become ready"
            time.sleep(0.1)
        body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        r = httpx.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=60
        )
        assert r.status_code == 200 and 1 <= r.json()["usage"]["completion_tokens"] <= 5  # EOS may come first
        assert "memento:kv_cache_budget_tokens 300.0" in httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130  # Ctrl-C: graceful shutdown, the shell's usual status
    assert proc.stderr.read().strip().endswith("memento serve: stopped")
