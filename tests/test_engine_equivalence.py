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
    evicting_decode,
    header,
    one_thread,  # noqa: F401 (fixture)
    restart_reference_logits,
    sharp_model,
    text_ids,
)
from memento.engine import Engine
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


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "hf"])
@pytest.mark.parametrize("budget", [None, 90], ids=["no-budget", "budget"])
def test_small_pages_match_dense(model, toy_tokenizer, markers, words, direct, budget):
    """Pages of 3 tokens: rows span many pages, evictions free pages mid-row and move other rows'
    pages into the holes, the pool grows (no budget) or stays within its cap (budget, with
    preemption); the logits are the dense reference's either way, direct forward or HF."""
    config = BlockMaskingConfig(keep_last_n_blocks=0)
    pairs = _streams(toy_tokenizer, markers, words, seed=13, count=4, prompt_blocks=1)
    engine = Engine(
        model,
        toy_tokenizer,
        masking=config,
        kv_budget_tokens=budget,
        max_batch_size=4,
        kv_page_size=3,
        direct_forward=direct,
        prefill_chunk_tokens=7,
    )
    if budget is None:
        engine.cache._allocate(4)  # start tiny, so the pool grows several times
    first_pool = engine.cache.pool_pages
    _check(engine, model, pairs, markers, config)
    cache = engine.cache
    if budget is None:
        assert cache.pool_pages > first_pool  # the pool had to grow (contents kept: logits match)
    else:
        assert cache.pool_pages <= -(-budget // 3) + 4  # never more than the cap
        assert engine.last_run["preemptions"] > 0
    assert cache.num_pages == 0 and cache.total_tokens() == 0  # every page back in the pool
    run = engine.last_run
    assert run["kv_allocated_bytes"] >= cache.pool_pages * 3 * run["kv_bytes_per_token"]
    assert run["peak_kv_used_bytes"] >= -(-run["peak_total_kv"] // 3) * 3 * run["kv_bytes_per_token"]


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
    config = BlockMaskingConfig()
    prompt, out = _streams(toy_tokenizer, markers, words, seed=2, count=1)[0]
    ids = prompt + out
    ref = dense_logits(model, ids, markers, config)
    _, _, logits = evicting_decode(model, ids, markers, config)
    for p in range(len(ids)):
        assert (logits[p] - ref[p]).abs().max() <= TOL


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
        cached = len(seqs[i]) if i in rows else first[i]
        assert batched.cache.row_positions(i) == single.cache.row_positions(i) == list(range(cached))
        for layer in range(batched.cache.num_layers):
            for a, b in zip(batched.cache.row_kv(layer, i), single.cache.row_kv(layer, i), strict=True):
                assert (a - b).abs().max() <= TOL


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


def _filled_cache(lengths: list[int], page_size: int = 8):
    """A paged cache with rows of the given lengths holding random keys/values; slot s of row r
    has logical position 1000 * r + s. Rows take their pages in turns, so pages interleave."""
    from memento.engine.cache import PagedKVCache

    cache = PagedKVCache(3, 2, 4, page_size=page_size, max_rows=len(lengths))
    for _ in lengths:
        cache.add_row()
    with torch.inference_mode():
        for s in range(max(lengths)):
            for r, n in enumerate(lengths):
                if s < n:
                    cache._ensure_slots(r, s + 1)
        cache.storage.copy_(torch.randn(cache.storage.shape))
        for r, n in enumerate(lengths):
            pages, offsets = cache._slots(r, torch.arange(n))
            cache.positions[pages, offsets] = torch.arange(n) + 1000 * r
            cache.bias[pages, offsets] = 0.0
            cache.lengths[r] = n
    return cache


def _rows(cache) -> list[list[torch.Tensor]]:
    return [
        [t.clone() for layer in range(cache.num_layers) for t in cache.row_kv(layer, r)]
        for r in range(cache.num_rows)
    ]


def _check_pool(cache) -> None:
    """Pages in use are a prefix, each owned by exactly one row, each row has just the pages it
    needs, and the slot bias marks exactly the slots that hold a token."""
    owned = sorted(p for r in range(cache.num_rows) for p in cache.pages[r])
    assert owned == list(range(cache.num_pages))
    for r in range(cache.num_rows):
        assert len(cache.pages[r]) == -(-cache.lengths[r] // cache.page_size)
        assert all(cache._page_row[p] == r for p in cache.pages[r])
    valid = torch.zeros(cache.num_pages, cache.page_size, dtype=torch.bool)
    for r in range(cache.num_rows):
        pages, offsets = cache._slots(r, torch.arange(cache.lengths[r]))
        valid[pages, offsets] = True
    if cache.num_pages:
        assert torch.equal(cache.bias[: cache.num_pages] == 0, valid)


@pytest.mark.parametrize("start,end", [(0, 3), (5, 30), (2, 3), (0, 1), (60, 70), (7, 7), (0, 70), (8, 24)])
def test_remove_slots_moves_every_layer(start, end):
    """Compaction on the paged cache: the row keeps its other slots in order (every layer, keys
    and values, positions), pages it no longer needs return to the pool (the used pages stay a
    prefix), and the other rows are untouched."""
    cache = _filled_cache([70, 70, 70])
    before = _rows(cache)
    with torch.inference_mode():
        cache.remove_slots(1, start, end)
    keep = [s for s in range(70) if not start <= s < end]
    assert cache.lengths[:3] == [70, len(keep), 70]
    after = _rows(cache)
    for r in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(after[r], before[r], strict=True))
        assert cache.row_positions(r) == [1000 * r + s for s in range(70)]
    assert all(torch.equal(a, b[:, keep]) for a, b in zip(after[1], before[1], strict=True))
    assert cache.row_positions(1) == [1000 + s for s in keep]
    _check_pool(cache)


@pytest.mark.parametrize("page_size", [1, 3, 8])
def test_paged_cache_random_operations(page_size):
    """Random appends, evictions (any span), truncations and row releases against a plain list
    model: every row keeps exactly its slots, in order, with their data and positions."""
    from memento.engine.cache import PagedKVCache

    rng = random.Random(page_size)
    cache = PagedKVCache(2, 1, 2, page_size=page_size)
    model: list[list[int]] = []  # per row: the logical position held by each slot
    next_pos = 0
    with torch.inference_mode():
        for _ in range(300):
            op = rng.random()
            if op < 0.1 or not model:
                cache.add_row()
                model.append([])
            elif op < 0.55:  # append a few tokens to a row (data = its position)
                r = rng.randrange(len(model))
                count = rng.randint(1, 2 * page_size + 1)
                n = cache.lengths[r]
                cache._ensure_slots(r, n + count)
                slots = torch.arange(n, n + count)
                pages, offsets = cache._slots(r, slots)
                values = torch.arange(next_pos, next_pos + count, dtype=torch.float32)
                cache.storage[:, :, pages, :, offsets] = values[:, None, None, None, None]
                cache.positions[pages, offsets] = values.long()
                cache.bias[pages, offsets] = 0.0
                cache.lengths[r] = n + count
                model[r] += list(range(next_pos, next_pos + count))
                next_pos += count
            elif op < 0.8:
                r = rng.randrange(len(model))
                n = len(model[r])
                start = rng.randint(0, n)
                end = rng.randint(start, n + 2)
                cache.remove_slots(r, start, end)
                del model[r][start:end]
            elif op < 0.9:
                r = rng.randrange(len(model))
                length = rng.randint(0, len(model[r]))
                cache.truncate(r, length)
                del model[r][length:]
            else:
                r = rng.randrange(len(model))
                moved = cache.release_row(r)
                last = model.pop()
                if moved is not None:
                    model[r] = last
            assert cache.num_rows == len(model)
            for r, slots in enumerate(model):
                assert cache.row_positions(r) == slots
                keys, values = cache.row_kv(1, r)
                assert keys[0, :, 0].tolist() == values[0, :, 1].tolist() == [float(x) for x in slots]
            _check_pool(cache)


def test_paged_rows_release_truncate_and_regrow():
    """Rows released (the last row moves into the hole: only its page table), truncated and grown
    again keep their contents; freed pages are reused, the used pages stay a prefix."""
    cache = _filled_cache([20, 9, 33, 1])
    before = _rows(cache)
    with torch.inference_mode():
        assert cache.release_row(1) == 3  # row 3 moves into row 1
        assert cache.num_rows == 3 and cache.lengths[:3] == [20, 1, 33]
        _check_pool(cache)
        after = _rows(cache)
        for r, old in ((0, 0), (1, 3), (2, 2)):
            assert all(torch.equal(a, b) for a, b in zip(after[r], before[old], strict=True))
        cache.truncate(2, 17)
        _check_pool(cache)
        assert all(torch.equal(a, b[:, :17]) for a, b in zip(_rows(cache)[2], before[2], strict=True))
        assert cache.release_row(2) is None
        cache._ensure_slots(0, 40)  # row 0 now holds pages for 40 slots (20 used)
        assert cache.num_pages == 5 + 1 and len(cache.pages[0]) == 5
    assert cache.total_tokens() == 21


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
