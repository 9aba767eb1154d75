"""The dashboard at `/` in a real headless browser (Debian's chromium): it loads while requests
run, polls /stats, and draws the KV chart in total and per request. The page writes what it drew
into `<body data-...>` (samples, requests, line points, coloured pixels read back from its canvases),
which `--dump-dom` hands to the test."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from engine_helpers import one_thread, sharp_model  # noqa: F401 (fixture)
from memento.engine import Engine
from memento.serve import EngineWorker, ServerSettings
from serve_helpers import ForcedReasoning, running_server

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip(
            "chromium is not installed: run `bash scripts/install-chromium.sh` (scripts/test.sh does)"
        )
    return path


def run_chromium(url: str, *extra: str, timeout: float = 60) -> str:
    """One headless chromium run on a fresh profile; returns stdout."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return result.stdout


def test_dashboard_draws_the_live_kv(toy_tokenizer, markers):
    chromium()
    model = sharp_model(toy_tokenizer, seed=6)
    hook = ForcedReasoning(toy_tokenizer, markers, blocks=15)
    worker = EngineWorker(lambda: Engine(model, toy_tokenizer, logits_hook=hook, kv_budget_tokens=1500))
    with running_server(worker, ServerSettings("toy")) as url:
        stop = threading.Event()

        def load():  # keep requests running while the page is open
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    body = {"messages": [{"role": "user", "content": "go"}], "temperature": 1.0}
                    threads = [
                        threading.Thread(
                            target=client.post, args=(url + "/v1/chat/completions",), kwargs={"json": body}
                        )
                        for _ in range(4)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            while not worker.snapshot()["running"]:
                threading.Event().wait(0.02)
            dom = run_chromium(url + "/", "--virtual-time-budget=3000", "--dump-dom")
        finally:
            stop.set()
            loader.join(120)
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    data = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1)))
    assert int(data["samples"]) >= 5, data
    assert int(data["requests"]) >= 2, data  # one line per request
    assert int(data["max-kv"]) > 0 and int(data["points"]) > 20, data
    assert int(data["inked"]) > 2000, data  # pixels in chart colours, read back from the canvases
    assert "memento serve" in dom and 'id="per"' in dom
