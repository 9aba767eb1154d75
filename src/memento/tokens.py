"""Marker tokens: their ids in a given tokenizer, and adding them to any HF tokenizer + model."""

from __future__ import annotations

from dataclasses import dataclass

from memento.format import BLOCK_END, BLOCK_START, SUMMARY_END, SUMMARY_START

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ASSISTANT = "assistant"


@dataclass(frozen=True)
class MarkerIds:
    """Token ids the block state machine reacts to.

    `im_start` / `assistant` open the assistant-section gate; when either is None the gate
    cannot be used (see `BlockMaskingConfig.require_assistant_section`).
    """

    block_start: int
    block_end: int
    summary_start: int
    summary_end: int
    im_start: int | None = None
    assistant: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> MarkerIds:
        """Resolve the markers in an HF tokenizer; raises ValueError if a block marker is missing."""
        ids = {}
        for name, text in (
            ("block_start", BLOCK_START),
            ("block_end", BLOCK_END),
            ("summary_start", SUMMARY_START),
            ("summary_end", SUMMARY_END),
        ):
            token_id = resolve_token_id(tokenizer, text)
            if token_id is None:
                raise ValueError(
                    f"tokenizer has no single token for {text!r}; add the markers first "
                    "(memento.tokens.add_memento_tokens, or `memento train` does it for you)"
                )
            ids[name] = token_id
        ids["im_start"] = resolve_token_id(tokenizer, IM_START)
        ids["assistant"] = resolve_token_id(tokenizer, ASSISTANT)
        return cls(**ids)

    @property
    def block_markers(self) -> tuple[int, int, int, int]:
        return (self.block_start, self.block_end, self.summary_start, self.summary_end)


def resolve_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` if it is one token: an integer string is taken as an id, otherwise the
    text must encode to exactly one id or be a vocabulary entry other than the unknown token."""
    if text.strip().isdigit():
        return int(text)
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if len(encoded) == 1:
        return int(encoded[0])
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)
