"""pass@k / maj@k / coverage against small hand-computed cases."""

from __future__ import annotations

import math

import pytest

from memento.eval.metrics import (
    compare_runs,
    coverage,
    ks_for,
    maj_at_k,
    mean_maj_at_k,
    mean_pass_at_k,
    pass1,
    pass_at_k,
)
from memento.kv import block_stats, compress_trace, expand_trace


def test_pass_at_k_hand_cases():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    # n - c < k: some correct sample is always drawn
    assert pass_at_k(3, 2, 2) == 1.0
    for n, c, k in [(10, 3, 4), (16, 5, 8), (7, 1, 7)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass1_mean_and_standard_error():
    acc, se = pass1({"a": [True, False], "b": [True, True], "c": [False, False]})
    assert acc == pytest.approx(0.5)
    # per-problem means 0.5, 1, 0 -> sample std 0.5 -> se 0.5 / sqrt(3)
    assert se == pytest.approx(0.5 / math.sqrt(3))
    assert mean_pass_at_k({"a": [True, False], "b": [False, False]}, 2) == pytest.approx(0.5)


def test_maj_at_k_full_vote_and_ties():
    # clear majority for the correct class
    assert maj_at_k([0, 0, 1], [True, True, False], 3) == 1.0
    # majority wrong
    assert maj_at_k([0, 1, 1], [True, False, False], 3) == 0.0
    # 2-2 tie between a right and a wrong class: expected 1/2 under uniform tie-breaking
    assert maj_at_k([0, 0, 1, 1], [True, True, False, False], 4) == 0.5
    # three-way tie, one correct
    assert maj_at_k([0, 1, 2], [False, True, False], 3) == pytest.approx(1 / 3)
    # missing answers do not vote
    assert maj_at_k([None, None, 0], [False, False, True], 3) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def test_maj_at_k_subsets_hand_computed():
    # classes [c, c, w], k=2: subsets {0,1}->1, {0,2}->tie 1/2, {1,2}->tie 1/2 => (1 + .5 + .5)/3
    assert maj_at_k([0, 0, 1], [True, True, False], 2) == pytest.approx(2 / 3)
    # k=1 is pass@1
    assert maj_at_k([0, 1, 1, 2], [True, False, False, False], 1) == pytest.approx(0.25)
    # sampled path (more subsets than the exact limit) is seeded and close to the exact value
    classes, correct = [0] * 6 + [1] * 6, [True] * 6 + [False] * 6
    exact = maj_at_k(classes, correct, 5)
    sampled = maj_at_k(classes, correct, 5, exact_limit=10, seed=1)
    assert sampled == maj_at_k(classes, correct, 5, exact_limit=10, seed=1)
    assert sampled == pytest.approx(exact, abs=0.05)
    assert mean_maj_at_k({"p": [0, 0, 1]}, {"p": [True, True, False]}, 3) == 1.0


def test_coverage_and_jaccard():
    a = {"p1": [True, False], "p2": [False, False], "p3": [True, True], "p4": [False, False]}
    b = {"p1": [False, False], "p2": [True, False], "p3": [False, True], "p4": [False, False]}
    assert coverage(a) == 0.5
    cmp = compare_runs(a, b)
    assert cmp["both"] == 1 and cmp["only_a"] == 1 and cmp["only_b"] == 1
    assert cmp["jaccard"] == pytest.approx(1 / 3)
    assert cmp["coverage_union"] == pytest.approx(0.75)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(4) == [1, 2, 4]
    assert ks_for(6) == [1, 2, 4, 6]


def test_trace_run_length_roundtrip_and_block_stats():
    trace = [10, 11, 12, 13, 5, 6, 7, 3, 3]
    runs = compress_trace(trace)
    assert runs == [[10, 4], [5, 3], [3, 1], [3, 1]]
    assert expand_trace(runs) == trace
    text = (
        "<think>\n<|block_start|>aaaa<|block_end|>\n<|summary_start|>b<|summary_end|>\n\n"
        "<|block_start|>cccccc<|block_end|>\n<|summary_start|>dd<|summary_end|>\n\n"
        "<|block_start|>unfinished"
    )
    stats = block_stats(text)
    assert (stats.blocks, stats.block_tokens, stats.memento_tokens, stats.basis) == (2, 10, 3, "chars")
    assert stats.compression == pytest.approx(0.3)
    assert block_stats("no blocks at all").compression is None
