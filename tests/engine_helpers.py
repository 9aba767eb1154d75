"""Shared pieces of the engine tests: a sharp tiny model, scripted block streams, dense references."""

from __future__ import annotations

import random

import pytest
import torch

from memento.hf import layer_windows, text_config
from memento.masking import BlockMaskingConfig, BlockTracker, attention_mask, in_window
from memento.tokens import MarkerIds
from memento.toy import build_tiny_model


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Run a test module's tiny models on one torch thread (restored afterwards). The models are far
    too small to gain from a second thread, and on a loaded machine the idle-spinning second
    thread makes every small op wait (measured: 5-10x slower engine tests under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sharp_model(tokenizer, seed: int = 0, sharpness: float = 4.0, layers: int = 2, hidden: int = 64):
    """A tiny Qwen3 whose attention is far from uniform (q/k norm weights scaled), so a wrongly
    visible or missing key changes the logits well beyond the tolerance."""
    model = build_tiny_model(
        tokenizer, layers=layers, hidden=hidden, heads=4, kv_heads=2, intermediate=128, seed=seed
    )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(sharpness)
            layer.self_attn.k_norm.weight.mul_(sharpness)
    return model


def text_ids(tokenizer, markers: MarkerIds) -> list[int]:
    """Ordinary token ids (no markers, chat specials, or role words)."""
    special = set(tokenizer.all_special_ids) | set(markers.block_markers)
    special |= {markers.im_start, markers.assistant}
    special |= {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<think>", "</think>", "user")}
    return [i for i in range(len(tokenizer)) if i not in special]


def header(tokenizer, question: str = "Q") -> list[int]:
    """`<|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\n` as ids (opens the gate)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def block_stream(
    markers: MarkerIds, words: list[int], rng: random.Random, blocks: int, *, tail: int = 3
) -> list[int]:
    """`<think>`-less stream of `blocks` [BS text BE \\n SS text SE \\n] pairs, then a few answer tokens."""
    out: list[int] = []
    for _ in range(blocks):
        out += [markers.block_start] + rng.choices(words, k=rng.randint(1, 6)) + [markers.block_end]
        out += rng.choices(words, k=rng.randint(0, 1))
        out += [markers.summary_start] + rng.choices(words, k=rng.randint(1, 3)) + [markers.summary_end]
        out += rng.choices(words, k=rng.randint(0, 2))
    return out + rng.choices(words, k=tail)


def routed_mask(model, mask_of_window):
    """The `attention_mask` argument that makes the model's *own* routing give every layer the
    mask of its window (`mask_of_window(window) -> [B, 1, Q, K]`): one tensor when all layers share
    a window, else transformers' mapping by layer type. Independent of memento's attention
    function, so the references below check the engine and training rather than mirror them."""
    windows = layer_windows(model.config)
    if len(set(windows)) == 1:
        return mask_of_window(windows[0])
    types = text_config(model.config).layer_types
    return {t: mask_of_window(w) for t, w in zip(types, windows, strict=False)}


@torch.no_grad()
def dense_logits(model, ids: list[int], markers: MarkerIds, config: BlockMaskingConfig) -> torch.Tensor:
    """One forward over the whole sequence with the Stage-2 mask (per layer window) and positions
    0..L-1."""
    out = model(
        input_ids=torch.tensor([ids]),
        position_ids=torch.arange(len(ids))[None],
        attention_mask=routed_mask(
            model, lambda w: attention_mask(ids, markers, config, window=w)[None, None]
        ),
    )
    return out.logits[0].float()


@torch.no_grad()
def restart_reference_logits(
    model, ids: list[int], markers: MarkerIds, config: BlockMaskingConfig, *, sequential: bool = False
) -> torch.Tensor:
    """Restart mode's dense definition: one forward over a virtual sequence in which every
    recomputed token appears again (original position id), seeing only what was cached before
    its `recompute_from` plus the earlier copies; later tokens see the copies, not the originals.
    Evictions that share a trigger are applied together, then everything from the earliest of
    their recompute points is recomputed once (docs/masking.md; `sequential=True` is the other
    reading, one eviction after the other, kept only to show that the choice matters).
    Returns, per logical position, the logits of the entry computed when that position was first
    consumed (what the next token is sampled from; recomputed copies only serve as keys)."""
    tracker = BlockTracker(markers, config)
    tokens: list[int] = []
    positions: list[int] = []
    rows: list[list[int]] = []  # allowed virtual keys per virtual entry (itself included)
    live: list[int] = []  # virtual entries currently "cached"
    first_entry: dict[int, int] = {}

    def add(p: int) -> None:
        v = len(tokens)
        tokens.append(ids[p])
        positions.append(p)
        rows.append(live + [v])
        live.append(v)
        first_entry.setdefault(p, v)

    def recompute(start: int) -> None:
        redo = [positions[v] for v in live if positions[v] >= start]
        live[:] = [v for v in live if positions[v] < start]
        for q in redo:
            add(q)

    for p, t in enumerate(ids):
        evs = tracker.feed(t)
        for ev in evs:
            live[:] = [v for v in live if not ev.start <= positions[v] < ev.end]
            if sequential and ev.recompute_from is not None:
                recompute(ev.recompute_from)
        starts = [ev.recompute_from for ev in evs if ev.recompute_from is not None]
        if starts and not sequential:
            recompute(min(starts))
        add(p)
    n = len(tokens)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for v, keys in enumerate(rows):
        mask[v, keys] = True
    pos = torch.tensor(positions)
    out = model(
        input_ids=torch.tensor([tokens]),
        position_ids=pos[None],
        attention_mask=routed_mask(
            model, lambda w: (mask & in_window(pos[:, None], pos[None, :], w))[None, None]
        ),
    )
    logits = out.logits[0].float()
    return torch.stack([logits[first_entry[p]] for p in range(len(ids))])


class LogitsRecorder:
    """Engine logits hook that records the logits each request was sampled from, by position."""

    def __init__(self) -> None:
        self.logits: dict[tuple[int, int], dict[int, torch.Tensor]] = {}

    def __call__(self, seq, logits: torch.Tensor) -> torch.Tensor:
        self.logits.setdefault((seq.prompt_index, seq.sample), {})[seq.pending_position] = logits.clone()
        return logits


@torch.no_grad()
def evicting_decode(model, ids, markers, config):
    """Token by token with a stock DynamicCache, evicting physically at each trigger (the engine's
    way, written out): returns the cache, the logical position of each kept slot and every step's logits."""
    from transformers import DynamicCache

    from memento.hf import remove_span, with_cache
    from memento.masking import evictions

    cache, slots = DynamicCache(), []
    evs = evictions(ids, markers, config)
    logits = []
    for p, t in enumerate(ids):
        for ev in (e for e in evs if e.trigger == p):
            first = sum(1 for s in slots if s < ev.start)
            last = sum(1 for s in slots if s < ev.end)
            remove_span(cache, first, last)
            del slots[first:last]
        out = model(
            input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[p]]), **with_cache(model, cache)
        )
        logits.append(out.logits[0, -1])
        slots.append(p)
    return cache, slots, torch.stack(logits)
