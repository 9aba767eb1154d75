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
