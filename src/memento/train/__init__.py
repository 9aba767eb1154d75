"""Supervised fine-tuning for MEMENTO: Stage 1 (full causal attention) and Stage 2 (block mask).

`train(SFTConfig(...)) -> TrainResult` runs one stage in-process; `memento train` is the CLI.
Importing this package does not import transformers (the trainer is built on first use).
"""

from memento.train.collator import MementoCollator, dense_mask_from_kill_times, padded_kill_times
from memento.train.data import DataStats, Sample, load_samples, tokenize_trace, tokenize_traces
from memento.train.sft import SFTConfig, TrainResult, load_config_file, train

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
