"""Block semantics: every case of the spec's §8 (shared/reference/block-masking.md) plus property tests."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memento.kv import kv_occupancy, kv_stats
from memento.masking import (
    BlockLengthCap,
    BlockMaskingConfig,
    BlockTracker,
    Eviction,
    SpanSet,
    attention_mask,
    evictions,
    in_window,
    kill_times,
)
from memento.tokens import MarkerIds

M = MarkerIds(block_start=10, block_end=11, summary_start=12, summary_end=13, im_start=1, assistant=3)
VOCAB = {"IM": 1, "user": 2, "assistant": 3, "<|im_end|>": 4, "\\n": 5, "<think>": 6, "</think>": 7, "Q": 8}
VOCAB |= {"BS": 10, "BE": 11, "SS": 12, "SE": 13}


def ids(text: str) -> list[int]:
    """Symbolic tokens -> ids; any unknown word becomes a plain text token."""
    out = []
    for word in text.split():
        out.append(VOCAB.get(word, 20 + (sum(map(ord, word)) % 50)))
    return out


HEADER = "IM user Q <|im_end|> \\n IM assistant \\n"  # positions 0-7, gate opens at 6
G1 = "<think> BS a b BE SS s SE BS c BE SS t SE </think> X"
G3 = "<think> BS a BE SS s SE BS b BE SS t SE BS c BE SS u SE </think> X"


def spans(seq: str, **cfg) -> list[tuple[int, int, int]]:
    return [(e.trigger, e.start, e.end) for e in evictions(ids(seq), M, BlockMaskingConfig(**cfg))]


def retained(seq: str, **cfg) -> list[int]:
    token_ids = ids(seq)
    gone = set()
    for e in evictions(token_ids, M, BlockMaskingConfig(**cfg)):
        gone |= set(range(e.start, e.end))
    return [p for p in range(len(token_ids)) if p not in gone]


def test_case01_basic_keep0():
    assert spans(f"{HEADER} {G1}") == [(15, 10, 12), (21, 17, 18)]
    assert retained(f"{HEADER} {G1}") == [p for p in range(24) if p not in (10, 11, 17)]
    mask = attention_mask(ids(f"{HEADER} {G1}"), M)
    assert not mask[15, 10] and not mask[15, 11] and mask[14, 10] and mask[14, 11]
    # the next token (24) would use RoPE position 24 and physical slot 24 - 3 = 21
    tracker = BlockTracker(M)
    tracker.feed_all(ids(f"{HEADER} {G1}"))
    assert tracker.removed == 3 and tracker.evicted.logical_to_physical(24) == 21


def test_case02_mask_delimiters():
    assert spans(f"{HEADER} {G1}", mask_delimiters=True) == [(15, 9, 13), (21, 16, 19)]
    want = [*range(0, 9), *range(13, 16), *range(19, 24)]
    assert retained(f"{HEADER} {G1}", mask_delimiters=True) == want


def test_case03_keep_minus_one_tracks_without_evicting():
    tracker = BlockTracker(M, BlockMaskingConfig.full())
    assert tracker.feed_all(ids(f"{HEADER} {G1}")) == []
    assert sum(b.complete for b in tracker.blocks) == 2


def test_case04_keep1():
    assert spans(f"{HEADER} {G3}", keep_last_n_blocks=1) == [(20, 10, 11), (26, 16, 17)]


def test_case05_keep_last_block_for_answer():
    got = spans(f"{HEADER} {G3}", keep_last_block_for_answer=True)
    assert got == [(15, 10, 11), (21, 16, 17)]
    mask = attention_mask(ids(f"{HEADER} {G3}"), M, BlockMaskingConfig(keep_last_block_for_answer=True))
    assert mask[27, 22] and mask[28, 22]  # </think> and the answer still see the last block


def test_case06_keep_last_block_for_answer_inert_with_keep1():
    assert spans(f"{HEADER} {G3}", keep_last_n_blocks=1, keep_last_block_for_answer=True) == spans(
        f"{HEADER} {G3}", keep_last_n_blocks=1
    )


def test_case07_restart_keep0():
    evs = evictions(ids(f"{HEADER} {G1}"), M, BlockMaskingConfig(restart_mode=True))
    assert evs == [Eviction(15, 9, 13, recompute_from=13), Eviction(21, 16, 19, recompute_from=19)]
    assert retained(f"{HEADER} {G1}", restart_mode=True) == [*range(0, 9), *range(13, 16), *range(19, 24)]
    with pytest.raises(ValueError, match="restart"):
        attention_mask(ids(f"{HEADER} {G1}"), M, BlockMaskingConfig(restart_mode=True))


def test_case08_compact_on_summary_end_false():
    tracker = BlockTracker(M, BlockMaskingConfig(compact_on_summary_end=False))
    assert tracker.feed_all(ids(f"{HEADER} {G1}")) == []
    assert len(tracker._pending) == 2
    # our clean behaviour: the BS flush honours the flag too
    cfg = BlockMaskingConfig(compact_on_summary_end=False, keep_last_block_for_answer=True)
    assert evictions(ids(f"{HEADER} {G3}"), M, cfg) == []


def test_case09_summary_without_block():
    assert spans(f"{HEADER} <think> SS s SE BS a BE SS t SE") == [(17, 13, 14)]


def test_case10_nested_blocks():
    seq = f"{HEADER} BS a BS b BE SS s SE c BE SS t SE"
    assert spans(seq) == [(15, 11, 12), (20, 9, 17)]
    tracker = BlockTracker(M)
    tracker.feed_all(ids(seq))
    assert tracker.evicted.spans == [(9, 17)] and tracker.removed == 8
    assert retained(seq) == [*range(0, 9), *range(17, 21)]


def test_case11_orphan_block_end_and_summary_end():
    assert spans(f"{HEADER} BE x SE BS a BE SS s SE") == [(16, 12, 13)]


def test_case12_13_generation_ends_mid_block_or_mid_summary():
    assert spans(f"{HEADER} <think> BS a b c") == []
    assert spans(f"{HEADER} <think> BS a BE SS s") == []


def test_case14_empty_block():
    assert spans(f"{HEADER} BS BE SS s SE") == []
    assert spans(f"{HEADER} BS BE SS s SE", mask_delimiters=True) == [(12, 8, 10)]


def test_case15_markers_in_user_message_ignored():
    seq = "IM user BS q BE SS r SE <|im_end|> IM assistant \\n <think> BS a BE SS s SE"
    assert spans(seq) == [(18, 14, 15)]


def test_case16_no_assistant_header():
    seq = "Q BS a BE SS s SE"
    assert spans(seq) == []
    assert spans(seq, require_assistant_section=False) == [(6, 2, 3)]


def test_case16_gate_unresolvable_warns_and_tracks_everything():
    markers = MarkerIds(10, 11, 12, 13, im_start=None, assistant=None)
    with pytest.warns(UserWarning, match="nothing would ever be evicted"):
        evs = evictions(ids("Q BS a BE SS s SE"), markers)
    assert [(e.trigger, e.start, e.end) for e in evs] == [(6, 2, 3)]


def test_case17_prompt_resident_block():
    seq = "IM assistant \\n <think> BS a BE SS s SE BS c BE SS t SE"
    assert spans(seq) == [(9, 5, 6), (15, 11, 12)]
    mask = attention_mask(ids(seq), M)
    assert not mask[9, 5]  # the prompt's own SE already cannot see its block


def test_case18_unsummarised_block_then_two_summaries():
    assert spans(f"{HEADER} BS a BE BS b BE SS s SE SS t SE") == [(16, 12, 13), (19, 9, 10)]


def test_case19_double_summary_start():
    assert spans(f"{HEADER} BS a BE SS s SS t SE") == [(15, 9, 10)]


def test_case20_summary_inside_open_block():
    assert spans(f"{HEADER} BS a SS s SE BE SS t SE") == [(16, 9, 13)]


def test_case21_whitespace_between_markers():
    seq = f"{HEADER} <think> \\n BS a BE \\n SS s SE \\n BS b BE SS t SE </think> X"
    assert spans(seq) == [(16, 11, 12), (23, 19, 20)]
    assert {9, 13, 17} <= set(retained(seq))


def test_case22_restart_keep1_rewinds_to_the_evicted_blocks_summary():
    evs = evictions(ids(f"{HEADER} {G3}"), M, BlockMaskingConfig(restart_mode=True, keep_last_n_blocks=1))
    # the original rewinds to the *current* block's SS (18, 24); the evicted block's own is right
    assert evs == [Eviction(20, 9, 12, recompute_from=12), Eviction(26, 15, 18, recompute_from=18)]


def test_case23_restart_keep_last_block_for_answer():
    cfg = BlockMaskingConfig(restart_mode=True, keep_last_block_for_answer=True)
    evs = evictions(ids(f"{HEADER} {G3}"), M, cfg)
    assert evs == [Eviction(15, 9, 12, recompute_from=12), Eviction(21, 15, 18, recompute_from=18)]


def test_case24_logical_to_physical_translation():
    s = SpanSet()
    s.add(10, 12)
    s.add(17, 18)
    assert s.removed == 3
    for logical, physical in [(0, 0), (9, 9), (10, 10), (12, 10), (16, 14), (18, 15), (23, 20)]:
        assert s.logical_to_physical(logical) == physical
    assert 11 in s and 12 not in s and 17 in s


def test_case25_two_evictions_in_one_prompt():
    seq = "IM assistant \\n BS a BE SS s SE BS b BE SS t SE"
    tracker = BlockTracker(M)
    evs = tracker.feed_all(ids(seq))
    assert [(e.trigger, e.start, e.end) for e in evs] == [(8, 4, 5), (14, 10, 11)]
    assert tracker.evicted.spans == [(4, 5), (10, 11)]


def test_case26_block_length_cap():
    cap = BlockLengthCap(M, 3)
    for t in ids("IM assistant BS x y"):
        cap.feed(t)
    assert not cap.must_close
    cap.feed(ids("z")[0])
    assert cap.must_close
    cap.feed(M.block_end)
    assert not cap.must_close and cap.count == 0
    cap = BlockLengthCap(M, 3)
    for t in ids("BS x SS y z"):  # markers are not counted
        cap.feed(t)
    assert cap.must_close
    assert not BlockLengthCap(M, 0).must_close


def test_case27_kv_accounting():
    occ = kv_occupancy(ids(f"{HEADER} {G1}"), M)
    assert (occ[14], occ[15], occ[20], occ[21], occ[23]) == (15, 14, 19, 19, 21)
    assert max(occ) == 21
    stats = kv_stats(ids(f"{HEADER} {G1}"), M, None, prompt_len=8)
    assert stats.trace == occ[7:23] and stats.peak == max(occ[7:23]) and stats.auc == sum(occ[7:23])


def test_worked_example_matrix_section_7_3():
    seq = "IM user Q <|im_end|> IM assistant <think> BS a b BE SS s SE BS c BE SS t SE </think> X"
    mask = attention_mask(ids(seq), M).int()
    rows = {13: "11111111001111", 19: "11111111001111101111", 21: "1111111100111110111111"}
    for q, want in rows.items():
        assert "".join(map(str, mask[q, : q + 1].tolist())) == want
    kill = kill_times(ids(seq), M)
    assert kill[8] == kill[9] == 13 and kill[15] == 19 and int(kill[0]) == len(ids(seq))
    md = attention_mask(ids(seq), M, BlockMaskingConfig(mask_delimiters=True)).int()
    assert "".join(map(str, md[21].tolist())) == "1111111000011100011111"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown block-masking option"):
        BlockMaskingConfig.from_dict({"keep_last_n_block": 0})
    with pytest.raises(ValueError, match="keep_last_n_blocks"):
        BlockMaskingConfig(keep_last_n_blocks=-2)
    with pytest.raises(ValueError, match="true or false"):
        BlockMaskingConfig(mask_delimiters="yes")
    with pytest.raises(ValueError, match="must be an int"):
        BlockMaskingConfig(keep_last_n_blocks=True)
    with pytest.raises(ValueError, match="max_block_tokens"):
        BlockMaskingConfig(max_block_tokens=-1)
    cfg = BlockMaskingConfig.from_dict({"keep_last_n_blocks": 2, "mask_delimiters": True})
    assert BlockMaskingConfig.from_dict(cfg.to_dict()) == cfg


# ---- property tests of the mask rule -------------------------------------------------------

_ALPHABET = [10, 11, 12, 13, 20, 21, 5]  # markers and text, mostly


@st.composite
def streams(draw):
    """A prompt header followed by a random (often malformed) marker/text stream."""
    prompt = draw(st.sampled_from([ids(HEADER), ids("IM assistant \\n"), ids("Q Q")]))
    body = draw(st.lists(st.sampled_from(_ALPHABET), max_size=40))
    return prompt + body


@st.composite
def well_formed(draw):
    out = ids(HEADER) + ids("<think>")
    for _ in range(draw(st.integers(1, 5))):
        out += [10] + [20] * draw(st.integers(0, 4)) + [11]
        out += [5] * draw(st.integers(0, 1)) + [12] + [21] * draw(st.integers(0, 3)) + [13]
    return out + ids("</think> X")


configs = st.builds(
    BlockMaskingConfig,
    keep_last_n_blocks=st.integers(-1, 3),
    mask_delimiters=st.booleans(),
    keep_last_block_for_answer=st.booleans(),
    require_assistant_section=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(streams(), configs)
def test_mask_rule_properties(token_ids, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = attention_mask(token_ids, M, cfg)
        occ = kv_occupancy(token_ids, M, cfg)
        evs = evictions(token_ids, M, cfg)
    n = len(token_ids)
    assert mask.shape == (n, n)
    assert not torch.triu(mask, 1).any(), "never attends to the future"
    assert mask.diagonal().all(), "every token sees itself"
    # once hidden, a key stays hidden for every later query
    for k in range(n):
        col = mask[k:, k].int()
        assert (col[1:] <= col[:-1]).all()
    # the occupancy after position p is exactly what row p may see
    assert occ == mask.sum(1).tolist()
    # an eviction hides its span from its trigger on, and never touches its trigger or later tokens
    for e in evs:
        assert e.end <= e.trigger
        assert not mask[e.trigger, e.start : e.end].any()
    if cfg.keep_last_n_blocks == -1:
        assert evs == []


@settings(max_examples=200, deadline=None)
@given(well_formed(), configs)
def test_well_formed_streams_keep_prompt_summaries_and_delimiters(token_ids, cfg):
    mask = attention_mask(token_ids, M, cfg)
    last = mask[-1]
    assert last[:8].all(), "the prompt stays visible"
    for p, t in enumerate(token_ids):
        if t in (12, 13, 21):  # summary markers and memento text are never evicted
            assert last[p]
        if t in (10, 11) and not cfg.mask_delimiters:
            assert last[p]
    if cfg.keep_last_n_blocks == 0 and not cfg.keep_last_block_for_answer:
        # every block content token is gone from its own SE on
        tracker = BlockTracker(M, cfg)
        tracker.feed_all(token_ids)
        for b in tracker.blocks:
            assert not mask[b.se :, b.bs + 1 : b.be].any()


@settings(max_examples=100, deadline=None)
@given(streams(), configs)
def test_incremental_tracker_equals_whole_sequence(token_ids, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = BlockTracker(M, cfg)
        live = []
        for t in token_ids:
            live.extend(tracker.feed(t))
        assert live == evictions(token_ids, M, cfg)


def test_config_for_mode_is_the_one_mode_mapping():
    from memento.masking import MODES, config_for_mode

    assert MODES == ("full", "memento", "restart")
    assert config_for_mode("full") == BlockMaskingConfig.full()
    assert config_for_mode("restart") == BlockMaskingConfig(restart_mode=True)
    assert config_for_mode("memento") == BlockMaskingConfig()
    keep1 = BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True)
    assert config_for_mode("memento", keep1) is keep1
    full = config_for_mode("full", keep1)
    assert full.keep_last_n_blocks == -1 and full.mask_delimiters and not full.evicts
    with pytest.raises(ValueError, match="needs mode='restart'"):
        config_for_mode("memento", BlockMaskingConfig(restart_mode=True))
    with pytest.raises(ValueError, match="mode must be one of"):
        config_for_mode("control")


# ---- sliding-window layers ----------------------------------------------------------------------


def test_in_window_uses_original_positions():
    assert in_window(10, 7, 4) and not in_window(10, 6, 4) and in_window(10, 0, None)
    q, k = torch.tensor([[10], [11]]), torch.tensor([[6, 7, 8]])
    assert in_window(q, k, 4).tolist() == [[False, True, True], [False, False, True]]
    with pytest.raises(ValueError, match=">= 1"):
        in_window(3, 2, 0)


def test_window_counts_positions_not_cached_entries():
    """After an eviction, "the last W cached entries" would reach back across the evicted block;
    the window rule does not: a key beyond W original positions stays hidden."""
    token_ids = ids(f"{HEADER} {G1}")  # block 1 content [10, 12) evicted at 15
    window = 6
    mask = attention_mask(token_ids, M, window=window)
    block_only = attention_mask(token_ids, M)
    q = 16  # BS of block 2: positions 11..16 are in its window, 11 is evicted
    assert mask[q].nonzero().flatten().tolist() == [12, 13, 14, 15, 16]
    assert block_only[q].nonzero().flatten().tolist()[-window:] == [9, 12, 13, 14, 15, 16]  # not these
    assert torch.equal(mask, block_only & torch.ones_like(mask).tril().triu(-(window - 1)))


@settings(max_examples=200, deadline=None)
@given(streams(), configs, st.integers(1, 12))
def test_windowed_occupancy_is_what_a_sliding_layer_may_see(token_ids, cfg, window):
    """memento.kv's per-layer count and this module's windowed mask are one rule."""
    from memento.kv import kv_occupancy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = attention_mask(token_ids, M, cfg, window=window)
        occ = kv_occupancy(token_ids, M, cfg, window=window)
        full = kv_occupancy(token_ids, M, cfg)
    assert occ == mask.sum(1).tolist()
    assert all(o <= min(f, window) for o, f in zip(occ, full, strict=True))
