"""Shared pieces of the `memento serve` tests: a real uvicorn server on a free port in a thread,
a logits hook that makes a random toy model write well-formed MEMENTO reasoning, and a toy
checkpoint whose greedy output is not degenerate."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from memento.serve import EngineWorker, ServerSettings, create_app
from memento.toy import build_tiny_model, save_toy_model

API_KEY = "test-key"


@contextmanager
def running_server(worker: EngineWorker, settings: ServerSettings, *, wait_ready: bool = True):
    """Serve the app on 127.0.0.1:<free port> in a background thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(worker, settings), log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started or (wait_ready and worker.state == "loading"):
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"server did not start (worker state {worker.state}: {worker.error})")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class ForcedReasoning:
    """Engine logits hook: every output is `<think>` + `blocks` blocks, each with its memento, then
    `</think>`, four answer tokens and `<|im_end|>` (24 tokens with two blocks). Free positions are
    the model's own (sampled or greedy) choice among ordinary tokens, so seeds and sampling still
    matter."""

    LENGTH = 24

    def __init__(self, tokenizer, markers, blocks: int = 2) -> None:
        m = markers
        think, end_think, im_end = (
            tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<|im_end|>")
        )
        block = [m.block_start, None, None, None, m.block_end, m.summary_start, None, m.summary_end]
        self.pattern = [think, None, *block * blocks, end_think, None, None, None, None, im_end]
        self.length = len(self.pattern)
        special = (
            set(tokenizer.all_special_ids) | set(m.block_markers) | {think, end_think, im_end, m.im_start}
        )
        self.special = sorted(special)

    def __call__(self, seq, logits: torch.Tensor) -> torch.Tensor:
        i = len(seq.output_ids)
        token = self.pattern[i] if i < len(self.pattern) else None
        logits = logits.clone()
        if token is None:
            logits[self.special] = float("-inf")
        else:
            logits[:] = float("-inf")
            logits[token] = 0.0
        return logits


def chaotic_checkpoint(directory: Path, tokenizer, seed: int = 0) -> Path:
    """A tiny Qwen3 with its weight matrices scaled 8x: still random, but its greedy output
    changes with the context instead of repeating one token, so output equality means something."""
    model = build_tiny_model(tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return save_toy_model(directory, tokenizer, model)
