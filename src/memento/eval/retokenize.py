"""Measuring responses in tokens: a token counter for block sizes, and the ids for offline KV replay."""

from __future__ import annotations

from collections.abc import Callable


def token_counter(tokenizer) -> Callable[[str], int]:
    return lambda s: len(tokenizer.encode(s, add_special_tokens=False)) if s else 0


class Retokenizer:
    """Turns (problem, response) text back into token ids for offline KV replay (`--tokenizer`)."""

    def __init__(self, name_or_path: str, prompt_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        from memento.tokens import MarkerIds, ensure_chat_template

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
            raise ValueError(f"--tokenizer {name_or_path}: cannot load a tokenizer ({exc})") from None
        ensure_chat_template(self.tokenizer)
        try:
            self.markers = MarkerIds.from_tokenizer(self.tokenizer)
        except ValueError as exc:
            raise ValueError(f"tokenizer {name_or_path!r} cannot measure KV: {exc}") from exc
        self.prompt_template = prompt_template
        self.count = token_counter(self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        # what the measured numbers depend on (part of each graded line's fingerprint)
        self.signature = f"{name_or_path}|{prompt_template}"

    def check_ids(self, ids: list[int], where: str) -> None:
        """Token ids must exist in this tokenizer (ids from another model's vocabulary would
        be replayed as garbage)."""
        top = max(ids, default=-1)
        if top >= self.vocab_size:
            raise ValueError(
                f"{where}: token id {top} is outside the tokenizer's vocabulary ({self.vocab_size} tokens); "
                "were these ids made with another tokenizer?"
            )

    def prompt_ids(self, problem: str) -> list[int]:
        content = self.prompt_template.format(problem=problem) if self.prompt_template else problem
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def output_ids(self, response: str) -> list[int]:
        return list(self.tokenizer.encode(response, add_special_tokens=False))
