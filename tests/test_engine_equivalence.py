"""The core property: incremental decoding with physical eviction gives the same logits as one
dense forward with the Stage-2 mask and the original position ids (restart mode: as its own
dense virtual-sequence definition)."""

from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import (
    LogitsRecorder,
    block_stream,
    dense_logits,
    header,
    one_thread,  # noqa: F401 (fixture)
    restart_reference_logits,
    sharp_model,
    text_ids,
)
from memento.engine import Engine
from memento.hf import with_cache
from memento.masking import BlockMaskingConfig, evictions

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return sharp_model(toy_tokenizer, seed=1)


@pytest.fixture(scope="module")
def words(toy_tokenizer, markers):
    return text_ids(toy_tokenizer, markers)


def _streams(toy_tokenizer, markers, words, seed: int, count: int, prompt_blocks: int = 0):
    """(prompt, output) pairs; with prompt_blocks > 0 the prompt's assistant part already holds blocks."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        prompt = header(toy_tokenizer, f"question {i}")
        if prompt_blocks:
            prompt += block_stream(markers, words, rng, prompt_blocks, tail=1)
        pairs.append((prompt, block_stream(markers, words, rng, rng.randint(2, 4))))
    return pairs


def _check(engine, model, pairs, markers, config, reference=dense_logits):
    recorder = LogitsRecorder()
    engine.logits_hook = recorder
    outs = engine.replay([p for p, _ in pairs], [o for _, o in pairs])
    worst = 0.0
    for i, ((prompt, out), res) in enumerate(zip(pairs, outs, strict=True)):
        ids = prompt + out
        assert res.token_ids == ids
        ref = reference(model, ids, markers, config)
        got = recorder.logits[(i, 0)]
        assert sorted(got) == list(range(len(prompt) - 1, len(ids) - 1))
        for p, row in got.items():
            worst = max(worst, (row - ref[p]).abs().max().item())
        assert res.evictions == evictions(ids, markers, config)
    assert worst <= TOL, worst
    return outs


CONFIGS = [
    BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=False),
    BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=True),
    BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=False),
    BlockMaskingConfig(keep_last_n_blocks=2, mask_delimiters=True),
    BlockMaskingConfig(keep_last_n_blocks=0, keep_last_block_for_answer=True),
    BlockMaskingConfig(keep_last_n_blocks=-1),
]


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=lambda c: (
        f"keep{c.keep_last_n_blocks}-md{int(c.mask_delimiters)}-lb{int(c.keep_last_block_for_answer)}"
    ),
)
@pytest.mark.parametrize("prompt_blocks", [0, 2])
def test_eviction_matches_dense_mask(model, toy_tokenizer, markers, words, config, prompt_blocks):
    """A batch of 3 requests whose rows evict at different times, alone in the cache or not."""
    pairs = _streams(
        toy_tokenizer, markers, words, seed=7 + prompt_blocks, count=3, prompt_blocks=prompt_blocks
    )
    engine = Engine(model, toy_tokenizer, mode="memento", masking=config, max_batch_size=4)
    outs = _check(engine, model, pairs, markers, config)
    if config.keep_last_n_blocks == 0:
        assert all(o.evictions for o in outs)
        triggers = [tuple(e.trigger for e in o.evictions) for o in outs]
        assert len(set(triggers)) == len(triggers)  # rows really evict at different steps


def test_prefill_in_chunks_matches_dense(model, toy_tokenizer, markers, words):
    """Prompts with several blocks prefilled in small chunks: evictions inside a chunk are masked,
    those at chunk boundaries are applied physically; same logits either way."""
    config = BlockMaskingConfig(keep_last_n_blocks=0)
    pairs = _streams(toy_tokenizer, markers, words, seed=3, count=2, prompt_blocks=4)
    engine = Engine(model, toy_tokenizer, masking=config, prefill_chunk_tokens=5)
    _check(engine, model, pairs, markers, config)


def test_preemption_under_budget_matches_dense(model, toy_tokenizer, markers, words):
    """A budget that forces preemption and resume-by-recomputation (evictions kept)."""
    config = BlockMaskingConfig(keep_last_n_blocks=0)
    pairs = _streams(toy_tokenizer, markers, words, seed=11, count=4, prompt_blocks=1)
    engine = Engine(model, toy_tokenizer, masking=config, kv_budget_tokens=90, max_batch_size=4)
    outs = _check(engine, model, pairs, markers, config)
    assert sum(o.num_preemptions for o in outs) > 0


@pytest.mark.parametrize(
    "config",
    [
        BlockMaskingConfig(restart_mode=True),
        BlockMaskingConfig(restart_mode=True, keep_last_n_blocks=1),
        BlockMaskingConfig(restart_mode=True, keep_last_block_for_answer=True),
    ],
    ids=["keep0", "keep1", "last-block"],
)
def test_restart_matches_virtual_sequence(model, toy_tokenizer, markers, words, config):
    pairs = _streams(toy_tokenizer, markers, words, seed=5, count=3, prompt_blocks=1)
    engine = Engine(model, toy_tokenizer, mode="restart", masking=config, max_batch_size=4)
    outs = _check(engine, model, pairs, markers, config, reference=restart_reference_logits)
    assert all(e.recompute_from is not None for o in outs for e in o.evictions)


def test_restart_reference_differs_from_memento(model, toy_tokenizer, markers, words):
    """Sanity of the test itself: the recompute changes the logits (the memento's KV no longer
    carries its block), so the restart check above is not vacuous."""
    prompt, out = _streams(toy_tokenizer, markers, words, seed=5, count=1)[0]
    ids = prompt + out
    restart = restart_reference_logits(model, ids, markers, BlockMaskingConfig(restart_mode=True))
    masked = dense_logits(model, ids, markers, BlockMaskingConfig(mask_delimiters=True))
    assert (restart - masked).abs().max() > 1e-2
    full = dense_logits(model, ids, markers, BlockMaskingConfig.full())
    assert (masked - full).abs().max() > 1e-2


def test_physical_removal_from_dynamic_cache(model, toy_tokenizer, markers, words):
    """The compaction primitive on a stock transformers DynamicCache."""
    from transformers import DynamicCache

    from memento.hf import remove_span

    config = BlockMaskingConfig()
    prompt, out = _streams(toy_tokenizer, markers, words, seed=2, count=1)[0]
    ids = prompt + out
    ref = dense_logits(model, ids, markers, config)
    cache = DynamicCache()
    evs = evictions(ids, markers, config)
    slots = list(range(0))
    with torch.no_grad():
        for p, t in enumerate(ids):
            for ev in (e for e in evs if e.trigger == p):
                first = sum(1 for s in slots if s < ev.start)
                last = sum(1 for s in slots if s < ev.end)
                remove_span(cache, first, last)
                del slots[first:last]
            logits = model(
                input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[p]]), **with_cache(model, cache)
            ).logits
            slots.append(p)
            assert (logits[0, -1] - ref[p]).abs().max() <= TOL


def test_batched_extend_equals_row_by_row(model, toy_tokenizer, markers, words):
    """Batched prefill on its own: rows with different cached lengths (offsets), different chunk
    lengths (padding), kill-time masks, and rows that are not contiguous give the same logits and
    the same cache contents as one forward per row."""
    rng = random.Random(4)
    seqs = [header(toy_tokenizer, f"q{i}") + rng.choices(words, k=rng.randint(2, 9)) for i in range(4)]
    first = [rng.randint(1, len(s) - 2) for s in seqs]  # tokens already cached per row
    batched = Engine(model, toy_tokenizer, mode="full", max_batch_size=4)
    single = Engine(model, toy_tokenizer, mode="full", max_batch_size=4)
    kills = [{}, {0: 3, 1: first[1] + 1}, {}, {2: first[3] + 1}]
    for engine in (batched, single):
        engine.cache.num_rows = 0
        for i, s in enumerate(seqs):
            engine.cache.add_row()
            engine.runner.extend(i, s[: first[i]], list(range(first[i])), list(range(first[i])))

    def args(i):
        pos = list(range(first[i], len(seqs[i])))
        return [seqs[i][p] for p in pos], pos, list(range(len(seqs[i]))), kills[i]

    rows = [3, 0, 1]  # not contiguous, not in order
    got = batched.runner.extend_batch(rows, *zip(*(args(i) for i in rows), strict=True))
    want = torch.stack([single.runner.extend(i, *args(i)) for i in rows])
    assert (got - want).abs().max() <= TOL
    for i in range(4):
        assert batched.cache.lengths[i] == single.cache.lengths[i]
        n = batched.cache.lengths[i]
        for a, b in zip(
            batched.cache.keys + batched.cache.values, single.cache.keys + single.cache.values, strict=True
        ):
            assert (a[i, :, :n] - b[i, :, :n]).abs().max() <= TOL


def test_direct_forward_matches_hf_forward(model, toy_tokenizer, markers, words):
    """The direct forward (plain tensor ops for Llama-family models, used by default) and the HF
    forward give the same logits through the whole engine, chunked prefill and preemption
    included; and the HF path alone still meets the dense Stage-2 reference."""
    config = BlockMaskingConfig(keep_last_n_blocks=0)
    pairs = _streams(toy_tokenizer, markers, words, seed=11, count=4, prompt_blocks=1)
    kwargs = dict(masking=config, kv_budget_tokens=90, max_batch_size=4, prefill_chunk_tokens=7)
    direct = Engine(model, toy_tokenizer, **kwargs)
    hf = Engine(model, toy_tokenizer, direct_forward=False, **kwargs)
    assert direct.runner.direct is not None and hf.runner.direct is None
    a = direct.logits_hook = LogitsRecorder()
    direct.replay([p for p, _ in pairs], [o for _, o in pairs])
    hf_outs = _check(hf, model, pairs, markers, config)  # records into its own hook
    assert sum(o.num_preemptions for o in hf_outs) > 0
    b = hf.logits_hook
    assert a.logits.keys() == b.logits.keys()
    for key, rows in a.logits.items():
        for p, row in rows.items():
            assert (row - b.logits[key][p]).abs().max() <= TOL


@pytest.mark.parametrize("start,end", [(0, 3), (5, 30), (2, 3), (0, 1), (60, 70), (7, 7)])
def test_remove_slots_moves_every_layer(start, end):
    """Compaction on the stacked cache: short tails (moved in gap-sized pieces), long tails behind
    a short gap (staged copy), an empty tail and an empty span; other rows untouched."""
    from memento.engine.cache import BatchedKVCache

    cache = BatchedKVCache(3, 2, 4, rows=3, capacity=8)
    cache.num_rows = 0
    for _ in range(3):
        cache.add_row()
    cache.reserve(length=70)
    cache.lengths[:3] = [70, 70, 70]
    with torch.inference_mode():
        cache.storage.copy_(torch.randn(cache.storage.shape))
        before = cache.storage.clone()
        cache.remove_slots(1, start, end)
    keep = [s for s in range(70) if not start <= s < end]
    assert cache.lengths[:3] == [70, len(keep), 70]
    assert torch.equal(cache.storage[:, :, 1, :, : len(keep)], before[:, :, 1, :, keep])
    assert torch.equal(cache.storage[:, :, [0, 2]], before[:, :, [0, 2]])
    assert torch.equal(cache.keys[2], cache.storage[2, 0]) and torch.equal(
        cache.values[0], cache.storage[0, 1]
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_direct_forward_other_llama_family(arch, toy_tokenizer, markers, words):
    """The direct forward on the other supported architectures (Qwen2: q/k/v biases, no q/k norm;
    Llama) meets the dense Stage-2 reference computed by the HF forward."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[arch]
    cfg = config_cls(
        vocab_size=len(toy_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        other = model_cls(cfg).eval()
        with torch.no_grad():
            for name, p in other.named_parameters():
                if name.endswith("bias"):  # Qwen2's q/k/v biases start at zero: make them count
                    p.normal_(0.0, 0.5)
                elif p.dim() == 1:  # norm weights: sharper attention
                    p.mul_(4.0)
    masking = BlockMaskingConfig(keep_last_n_blocks=0)
    pairs = _streams(toy_tokenizer, markers, words, seed=8, count=3, prompt_blocks=1)
    engine = Engine(other, toy_tokenizer, masking=masking, max_batch_size=4, prefill_chunk_tokens=9)
    assert engine.runner.direct is not None
    _check(engine, other, pairs, markers, masking)


def test_restart_two_evictions_at_one_trigger(model, toy_tokenizer, markers, words):
    """Regression (review bug 5): two restart evictions that share a trigger (the next
    `<|block_start|>` flushes two pending blocks) are applied together, then everything from the
    earliest recompute point is recomputed once (docs/masking.md). The engine and its oracle agree
    on that definition; the one-after-the-other reading gives different logits, so it matters."""
    rng = random.Random(6)
    m = markers
    w = lambda k: rng.choices(words, k=k)  # noqa: E731
    # block 0 unsummarised, block 1, then two summaries: the first belongs to block 1, the second to 0
    out = [m.block_start, *w(3), m.block_end, m.block_start, *w(3), m.block_end]
    out += [m.summary_start, *w(2), m.summary_end, m.summary_start, *w(2), m.summary_end, *w(1)]
    out += [m.block_start, *w(2), m.block_end, m.summary_start, *w(1), m.summary_end, *w(3)]
    prompt = header(toy_tokenizer, "two at once")
    config = BlockMaskingConfig(restart_mode=True, keep_last_block_for_answer=True)
    ids = prompt + out
    evs = evictions(ids, markers, config)
    assert len(evs) >= 2 and evs[0].trigger == evs[1].trigger
    assert evs[0].recompute_from != evs[1].recompute_from
    engine = Engine(model, toy_tokenizer, mode="restart", masking=config)
    _check(engine, model, [(prompt, out)], markers, config, reference=restart_reference_logits)
    together = restart_reference_logits(model, ids, markers, config)
    one_by_one = restart_reference_logits(model, ids, markers, config, sequential=True)
    assert (together - one_by_one).abs().max() > 1e-2


def test_hf_path_uses_the_current_cache_convention(model, toy_tokenizer, markers, words):
    """Regression (review bug 1): on transformers 5.24 the HF path crashed in `cache.update(...,
    kwargs=...)` and passed the deprecated `past_key_values=`. It runs, and warns about nothing."""
    import warnings

    pairs = _streams(toy_tokenizer, markers, words, seed=12, count=1)
    engine = Engine(model, toy_tokenizer, direct_forward=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning for `past_key_values` would fail here
        engine.replay([p for p, _ in pairs], [o for _, o in pairs])
