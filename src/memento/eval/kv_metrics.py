"""Per-sample memory numbers: peak / AUC KV, blocks, block and memento tokens, compression.

KV numbers come from the engine's live trace, or — for responses generated elsewhere — from
replaying the token ids through `memento.masking.kv_stats` (the same tracker the engine uses, so
both paths agree). Block statistics come from `memento.format.parse` on the text, counted in
tokens when a tokenizer is at hand and in characters otherwise (the summary says which).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memento.format import parse

MODES = ("full", "memento", "restart")


def masking_config(mode: str):
    """The block-masking semantics a generation mode runs under (for offline KV replay)."""
    from memento.masking import BlockMaskingConfig

    if mode == "full":
        return BlockMaskingConfig.full()
    if mode == "restart":
        return BlockMaskingConfig(restart_mode=True)
    return BlockMaskingConfig()


def compress_trace(trace: Sequence[int]) -> list[list[int]]:
    """Run-length form of a KV trace: [start, length] runs that grow by one token per step.

    A sawtooth of 30k steps becomes one pair per eviction, small enough for results.jsonl."""
    runs: list[list[int]] = []
    for value in trace:
        if runs and value == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([int(value), 1])
    return runs


def expand_trace(runs: Sequence[Sequence[int]]) -> list[int]:
    return [start + i for start, length in runs for i in range(length)]


@dataclass(frozen=True)
class BlockStats:
    blocks: int
    block_tokens: int
    memento_tokens: int
    basis: str  # "tokens" or "chars"

    @property
    def compression(self) -> float | None:
        """Memento size per block size (lower = denser mementos); None without finished blocks."""
        return self.memento_tokens / self.block_tokens if self.block_tokens else None


def block_stats(text: str, count: Callable[[str], int] | None = None) -> BlockStats:
    """Count finished (block, memento) pairs in a response; `count` measures text in tokens."""
    trace, _problems = parse(text or "")
    pairs = [b for b in trace.blocks if b.memento.strip()]
    measure = count or len
    return BlockStats(
        blocks=len(pairs),
        block_tokens=sum(measure(b.reasoning) for b in pairs),
        memento_tokens=sum(measure(b.memento) for b in pairs),
        basis="tokens" if count is not None else "chars",
    )


def token_counter(tokenizer) -> Callable[[str], int]:
    return lambda s: len(tokenizer.encode(s, add_special_tokens=False)) if s else 0


class Retokenizer:
    """Turns (problem, response) text back into token ids for offline KV replay (`--tokenizer`)."""

    def __init__(self, name_or_path: str, prompt_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        from memento.tokens import MarkerIds, ensure_chat_template

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc
        ensure_chat_template(self.tokenizer)
        try:
            self.markers = MarkerIds.from_tokenizer(self.tokenizer)
        except ValueError as exc:
            raise ValueError(f"tokenizer {name_or_path!r} cannot measure KV: {exc}") from exc
        self.prompt_template = prompt_template
        self.count = token_counter(self.tokenizer)

    def prompt_ids(self, problem: str) -> list[int]:
        content = self.prompt_template.format(problem=problem) if self.prompt_template else problem
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def output_ids(self, response: str) -> list[int]:
        return list(self.tokenizer.encode(response, add_special_tokens=False))


def replay_kv(token_ids: Sequence[int], prompt_len: int, markers, mode: str) -> tuple[int, int, list[int]]:
    """(peak, auc, trace) of one generation replayed under `mode`'s masking rule."""
    from memento.masking import kv_stats

    if len(token_ids) <= prompt_len:
        return prompt_len, 0, []
    stats = kv_stats(list(token_ids), markers, masking_config(mode), max(prompt_len, 1))
    return stats.peak, stats.auc, stats.trace
