"""Marker tokens: their ids in a given tokenizer, and adding them to any HF tokenizer + model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import AddedToken

from memento.format import BLOCK_END, BLOCK_START, MARKERS, SUMMARY_END, SUMMARY_START, THINK_END, THINK_START

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


# --- adding the markers to a tokenizer + model -------------------------------------------------

THINK_TOKENS = (THINK_START, THINK_END)

# Words whose embeddings seed each new token (MEMENTO paper: mean of semantically related tokens),
# so a fresh marker starts near a meaningful direction instead of at a random point.
RELATED_WORDS: dict[str, tuple[str, ...]] = {
    BLOCK_START: ("block", "start", "begin", "section", "step"),
    BLOCK_END: ("block", "end", "finish", "section", "done"),
    SUMMARY_START: ("summary", "summarize", "brief", "recap", "overview"),
    SUMMARY_END: ("summary", "end", "finish", "done", "complete"),
    THINK_START: ("think", "thought", "reason", "reasoning", "start", "begin"),
    THINK_END: ("think", "thought", "reason", "reasoning", "end", "done"),
}


def _in_vocab(tokenizer, text: str) -> bool:
    return text in tokenizer.get_vocab()


def related_token_ids(tokenizer, words: Iterable[str], exclude: Iterable[int] = ()) -> list[int]:
    """Every sub-token id of each word, encoded bare and with a leading space (order kept, no
    repeats). Ids in `exclude` (the tokens being added) and the unknown token are left out."""
    skip = set(exclude)
    if tokenizer.unk_token_id is not None:
        skip.add(tokenizer.unk_token_id)
    ids: list[int] = []
    for word in words:
        for variant in (word, " " + word):
            for token_id in tokenizer.encode(variant, add_special_tokens=False):
                if token_id not in skip and token_id not in ids:
                    ids.append(int(token_id))
    return ids


def add_memento_tokens(tokenizer, model=None, *, noise_std: float = 0.01, seed: int = 0) -> MarkerIds:
    """Add the block markers (and `<think>`/`</think>` where missing) to any HF tokenizer, and
    give `model` embedding rows for them initialised as the mean of related tokens plus
    N(0, noise_std) noise. Idempotent: tokens already present are neither re-added nor re-initialised.
    """
    wanted = [t for t in (*MARKERS, *THINK_TOKENS) if not _in_vocab(tokenizer, t)]
    if wanted:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in wanted], special_tokens=True
        )
    new_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in wanted}
    if model is not None:
        _init_new_embeddings(tokenizer, model, new_ids, noise_std=noise_std, seed=seed)
    return MarkerIds.from_tokenizer(tokenizer)


@torch.no_grad()
def _init_new_embeddings(tokenizer, model, new_ids: dict[str, int], *, noise_std: float, seed: int) -> None:
    old_rows = model.get_input_embeddings().weight.shape[0]
    # Our tokens may also exist in the tokenizer already but lack a row in the model.
    for token in (*MARKERS, *THINK_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token) if _in_vocab(tokenizer, token) else None
        if token_id is not None and token_id >= old_rows:
            new_ids.setdefault(token, token_id)
    if len(tokenizer) > old_rows:
        from memento.hf import resize_embeddings  # imports transformers: only when a model is given

        resize_embeddings(model, len(tokenizer))  # our rows are initialised below
    if not new_ids:
        return
    exclude = set(new_ids.values())
    related = {
        tok: [i for i in related_token_ids(tokenizer, RELATED_WORDS[tok], exclude) if i < old_rows]
        for tok in new_ids
    }
    generator = torch.Generator().manual_seed(seed)
    noise = {
        tok: torch.randn(model.get_input_embeddings().weight.shape[1], generator=generator) * noise_std
        for tok in sorted(new_ids, key=new_ids.get)
    }

    def fill(weight: torch.Tensor) -> None:
        base = weight[:old_rows].float()
        for tok, token_id in new_ids.items():
            ids = related[tok]
            mean = base[ids].mean(0) if ids else base.mean(0)
            weight[token_id] = (mean + noise[tok]).to(weight.dtype)

    inp = model.get_input_embeddings().weight
    fill(inp)
    out_layer = model.get_output_embeddings()
    if out_layer is not None and out_layer.weight.data_ptr() != inp.data_ptr():
        fill(out_layer.weight)
        bias = getattr(out_layer, "bias", None)
        if bias is not None:
            for tok, token_id in new_ids.items():
                ids = related[tok]
                bias[token_id] = bias[:old_rows][ids].mean() if ids else bias[:old_rows].mean()


# --- chat template ------------------------------------------------------------------------------

# ChatML. Our code never injects a system prompt (MEMENTO checkpoints are trained without one),
# but a system message the caller passes is rendered like any other. The generation prompt is
# exactly `<|im_start|>assistant\n`: the model writes `<think>` itself.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template our ChatML one (only if it has the ChatML tokens).

    Returns True if the template was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    if not (_in_vocab(tokenizer, IM_START) and _in_vocab(tokenizer, IM_END)):
        return False
    tokenizer.chat_template = CHATML_TEMPLATE
    return True
