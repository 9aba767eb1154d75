"""Memento traces -> token ids + labels for SFT.

The prompt (chat template up to and including the assistant header) and the completion (the
rendered trace + the end-of-turn token) are tokenized separately and concatenated, so the label
boundary is exact for any tokenizer and no template can rewrite the assistant's reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memento.format import MementoTrace, read_traces
from memento.tokens import IM_END, resolve_token_id

IGNORE_INDEX = -100
FORMATS = ("memento", "control")
OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class Sample:
    """One tokenized training example; `labels` is -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    """What tokenization did to the dataset (reported before training starts)."""

    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0
    max_length_seen: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.samples} samples, {self.tokens} tokens ({self.label_tokens} with loss), "
            f"longest {self.max_length_seen}; truncated {self.truncated}, dropped {self.dropped}"
        )


def end_of_turn(tokenizer) -> str:
    """The text that ends the assistant turn: `<|im_end|>` when it is a token, else EOS."""
    if resolve_token_id(tokenizer, IM_END) is not None:
        return IM_END
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has neither '<|im_end|>' nor an EOS token to end the assistant turn")
    return tokenizer.eos_token


def prompt_text(tokenizer, problem: str, system_prompt: str | None = None) -> str:
    """Chat-templated prompt ending with the assistant header (the generation prompt)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def completion_text(trace: MementoTrace, fmt: str = "memento") -> str:
    """What the assistant writes: the rendered trace (memento or control format)."""
    if fmt == "memento":
        return trace.render()
    if fmt == "control":
        return trace.render_control()
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def tokenize_trace(
    trace: MementoTrace,
    tokenizer,
    *,
    fmt: str = "memento",
    system_prompt: str | None = None,
    eot: str | None = None,
) -> Sample:
    """Tokenize one trace: loss on everything the assistant writes, end-of-turn included."""
    prompt_ids = tokenizer.encode(
        prompt_text(tokenizer, trace.problem, system_prompt), add_special_tokens=False
    )
    eot = end_of_turn(tokenizer) if eot is None else eot
    completion_ids = tokenizer.encode(completion_text(trace, fmt) + eot, add_special_tokens=False)
    ids = [int(t) for t in (*prompt_ids, *completion_ids)]
    labels = [IGNORE_INDEX] * len(prompt_ids) + [int(t) for t in completion_ids]
    return Sample(ids, labels)


def tokenize_traces(
    traces: Sequence[MementoTrace],
    tokenizer,
    *,
    fmt: str = "memento",
    system_prompt: str | None = None,
    max_length: int | None = None,
    overlong: str = "truncate",
) -> tuple[list[Sample], DataStats]:
    """Tokenize a dataset, truncating or dropping samples longer than `max_length`."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    eot = end_of_turn(tokenizer)
    stats = DataStats()
    samples: list[Sample] = []
    for trace in traces:
        sample = tokenize_trace(trace, tokenizer, fmt=fmt, system_prompt=system_prompt, eot=eot)
        stats.max_length_seen = max(stats.max_length_seen, len(sample))
        if max_length and len(sample) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            sample = Sample(sample.input_ids[:max_length], sample.labels[:max_length])
            if all(label == IGNORE_INDEX for label in sample.labels):
                stats.dropped += 1  # the prompt alone fills max_length: nothing to learn
                continue
            stats.truncated += 1
        samples.append(sample)
        stats.tokens += len(sample)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in sample.labels)
    stats.samples = len(samples)
    if not samples:
        raise ValueError(
            f"no training samples left ({stats.dropped} dropped as longer than max_length={max_length}); "
            "raise --max-length or use --overlong truncate"
        )
    return samples, stats


def load_samples(
    path: str | Path,
    tokenizer,
    *,
    fmt: str = "memento",
    system_prompt: str | None = None,
    max_length: int | None = None,
    overlong: str = "truncate",
) -> tuple[list[Sample], DataStats]:
    """Read a JSONL file of traces (bad lines raise ValueError naming file:line) and tokenize it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: training data file not found")
    traces = read_traces(path)
    if not traces:
        raise ValueError(f"{path}: no traces in file (expected JSONL lines with problem/blocks/answer)")
    return tokenize_traces(
        traces, tokenizer, fmt=fmt, system_prompt=system_prompt, max_length=max_length, overlong=overlong
    )
