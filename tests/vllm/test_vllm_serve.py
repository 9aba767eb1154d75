"""`memento vllm-serve MODEL` with no other flag: it starts on this kind of machine (the CPU KV
space is sized explicitly), answers a chat completion, refuses bad per-request MEMENTO options with
HTTP 400 and keeps serving (review bug 4, server side)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import HAVE_VLLM, SKIP_REASON

if not HAVE_VLLM:
    pytest.skip(SKIP_REASON, allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w+")
    command = [sys.executable, "-c", "from memento.cli import app; app()", "vllm-serve", str(model_dir)]
    process = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {process.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("server did not come up within 300 s")
        log.seek(0)
        yield port, log.read()
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_out_of_the_box_chat_bad_options_400_then_serving(server, model_dir):
    port, startup = server
    first = startup.splitlines()[0]
    assert first.startswith("memento vllm-serve:") and "CPU KV cache" in first  # says how it sized KV
    chat = {
        "model": str(model_dir),
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "max_tokens": 6,
    }
    status, body = _post(port, chat)
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    bad = {**chat, "vllm_xargs": {"memento": json.dumps({"keep_last_n_block": 1})}}
    status, body = _post(port, bad)
    assert status == 400 and "keep_last_n_block" in body["error"]["message"]
    status, _ = _post(port, {**chat, "vllm_xargs": {"memento": "{not json"}})
    assert status == 400
    good = {**chat, "vllm_xargs": {"memento": json.dumps({"keep_last_n_blocks": 1})}}
    status, body = _post(port, good)
    assert status == 200 and body["usage"]["completion_tokens"] > 0
