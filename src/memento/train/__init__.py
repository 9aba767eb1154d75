"""Supervised fine-tuning for MEMENTO: Stage 1 (full causal attention) and Stage 2 (block mask).

`train(SFTConfig(...)) -> TrainResult` runs one stage in-process; `memento train` is the CLI.
Importing this package imports neither torch nor transformers: the names below load on first use
(PEP 562), so `memento --help` and argument errors stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memento.train.collator import MementoCollator, dense_mask_from_kill_times, padded_kill_times
    from memento.train.data import DataStats, Sample, load_samples, tokenize_trace, tokenize_traces
    from memento.train.options import load_config_file
    from memento.train.sft import SFTConfig, TrainResult, train

_WHERE = {
    "MementoCollator": "memento.train.collator",
    "dense_mask_from_kill_times": "memento.train.collator",
    "padded_kill_times": "memento.train.collator",
    "DataStats": "memento.train.data",
    "Sample": "memento.train.data",
    "load_samples": "memento.train.data",
    "tokenize_trace": "memento.train.data",
    "tokenize_traces": "memento.train.data",
    "SFTConfig": "memento.train.sft",
    "TrainResult": "memento.train.sft",
    "load_config_file": "memento.train.options",
    "train": "memento.train.sft",
}
__all__ = [
    "DataStats",
    "MementoCollator",
    "SFTConfig",
    "Sample",
    "TrainResult",
    "dense_mask_from_kill_times",
    "load_config_file",
    "load_samples",
    "padded_kill_times",
    "tokenize_trace",
    "tokenize_traces",
    "train",
]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'memento.train' has no attribute {name!r}")
