"""Synthetic Memento traces for the training tests: counting tasks a tiny model learns quickly."""

from __future__ import annotations

import json
import random
from pathlib import Path

from memento.format import Block, MementoTrace


def count_trace(start: int, stop: int, per_block: int = 3) -> MementoTrace:
    """ "Count from a to b": each block counts a few numbers, its memento keeps the last one."""
    numbers = list(range(start, stop + 1))
    blocks = []
    for i in range(0, len(numbers), per_block):
        chunk = numbers[i : i + per_block]
        blocks.append(Block(" ".join(str(n) for n in chunk), f"at {chunk[-1]}"))
    return MementoTrace(f"Count from {start} to {stop}.", tuple(blocks), f"The answer is {stop}.")


def make_traces(n: int = 32, seed: int = 0) -> list[MementoTrace]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randint(1, 20)
        out.append(count_trace(start, start + rng.randint(3, 9)))
    return out


def write_jsonl(path: Path, traces: list[MementoTrace]) -> Path:
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in traces))
    return path
