"""Segmentation: constraints, exactness against brute force, never worse than the original DP, speed."""

from __future__ import annotations

import itertools
import json
import random
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memento.annotate import segmentation as seg
from memento.annotate.scoring import heuristic_scores
from memento.annotate.segmentation import SegmentationWarning, objective, original_dp_cuts, segment
from memento.annotate.sentences import RegexTokenCounter, split_sentences
from memento.annotate.sources import split_thinking

TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / "sky-t1-aime24.jsonl"


def _blocks_from_cuts(cuts, n):
    starts = [0, *cuts]
    return list(zip(starts, [c - 1 for c in cuts] + [n - 1], strict=True))


def brute_force(tokens, scores, m, lam, k_lo, k_hi, score_mean):
    n, best = len(tokens), None
    for r in range(n):
        for cuts in itertools.combinations(range(1, n), r):
            blocks = _blocks_from_cuts(list(cuts), n)
            if not k_lo <= len(blocks) <= (k_hi or n):
                continue
            if any(sum(tokens[a : b + 1]) < m for a, b in blocks):
                continue
            v = objective(tokens, scores, blocks, variance_penalty=lam, score_mean=score_mean)
            best = v if best is None or v > best else best
    return best


def _check_valid(blocks, tokens, m, n):
    assert blocks[0][0] == 0 and blocks[-1][1] == n - 1
    for (_a, b), (c, _) in itertools.pairwise(blocks):
        assert c == b + 1
    assert all(sum(tokens[a : b + 1]) >= m for a, b in blocks)


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_matches_brute_force_random(method):
    rng = random.Random(1234)
    for _ in range(250):
        n = rng.randint(1, 12)
        tokens = [rng.randint(0, 150) for _ in range(n)]
        scores = [rng.choice([0, 0.5, 1, 1.5, 2, 2.5, 3]) for _ in range(n - 1)]
        m, lam = rng.choice([0, 60, 120, 200]), rng.choice([0.0, 0.5, 2.0, 5.0])
        k_lo, k_hi = rng.choice([1, 1, 2]), rng.choice([None, None, 3])
        sm = rng.choice(["per_block", "per_boundary"])
        expected = brute_force(tokens, scores, m, lam, k_lo, k_hi, sm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SegmentationWarning)
            blocks = segment(
                tokens, scores, min_block_tokens=m, variance_penalty=lam, min_blocks=k_lo, max_blocks=k_hi,
                score_mean=sm, method=method,
            )  # fmt: skip
        if expected is None:
            assert blocks == [(0, n - 1)]
            continue
        _check_valid(blocks, tokens, m, n)
        got = objective(tokens, scores, blocks, variance_penalty=lam, score_mean=sm)
        assert got == pytest.approx(expected, abs=1e-9), (tokens, scores, m, lam, blocks)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 120), min_size=2, max_size=11),
    st.data(),
    st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    st.sampled_from([0, 50, 100]),
)
def test_property_auto_equals_brute_force(tokens, data, lam, m):
    scores = data.draw(
        st.lists(
            st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), min_size=len(tokens) - 1, max_size=len(tokens) - 1
        )
    )
    expected = brute_force(tokens, scores, m, lam, 1, None, "per_block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SegmentationWarning)
        blocks = segment(tokens, scores, min_block_tokens=m, variance_penalty=lam)
    if expected is None:
        assert blocks == [(0, len(tokens) - 1)]
    else:
        assert objective(tokens, scores, blocks, variance_penalty=lam) == pytest.approx(expected, abs=1e-9)


def _random_instance(rng, n):
    tokens = [max(1, int(rng.lognormvariate(rng.uniform(2.5, 4.0), 0.7))) for _ in range(n)]
    scores = [rng.choice([0, 0, 0.5, 1, 1, 1.5, 2, 2.5, 3]) for _ in range(n - 1)]
    return tokens, scores


def test_fast_never_worse_than_original_dp_or_exact(monkeypatch):
    """Without the original DP among its candidates, the fast optimiser still matches or beats it."""
    monkeypatch.setattr(seg, "_ORIGINAL_WORK_LIMIT", -1)
    rng = random.Random(99)
    for _ in range(25):
        n = rng.randint(30, 160)
        tokens, scores = _random_instance(rng, n)
        lam = rng.choice([0.5, 1.0, 2.0])
        if sum(tokens) < 200:
            continue
        fast = objective(
            tokens, scores, segment(tokens, scores, variance_penalty=lam, method="fast"), variance_penalty=lam
        )
        cuts = original_dp_cuts(tokens, scores, 200, lam, 1, sum(tokens) // 200)
        orig = objective(tokens, scores, _blocks_from_cuts(cuts, n), variance_penalty=lam)
        assert fast >= orig - 1e-9
        if n <= 70:
            exact = objective(
                tokens,
                scores,
                segment(tokens, scores, variance_penalty=lam, method="exact"),
                variance_penalty=lam,
            )
            assert fast == pytest.approx(exact, abs=1e-9)
            assert exact >= orig - 1e-9


def test_infeasible_returns_one_block_with_warning():
    with pytest.warns(SegmentationWarning):
        assert segment([10, 20, 30], [1.0, 2.0], min_block_tokens=200) == [(0, 2)]
    with pytest.warns(SegmentationWarning):
        assert segment([150, 150], [3.0], min_block_tokens=100, min_blocks=3) == [(0, 1)]
    assert segment([], []) == []
    with pytest.raises(ValueError):
        segment([1, 2], [])
    with pytest.raises(ValueError):
        segment([1, 2], [float("nan")])


def test_prefers_high_scores_and_balance():
    tokens = [100] * 8
    scores = [0, 0, 0, 3, 0, 0, 0]
    assert segment(tokens, scores, min_block_tokens=200) == [(0, 3), (4, 7)]


def test_900_sentences_under_a_second():
    rng = random.Random(5)
    tokens, scores = _random_instance(rng, 900)
    segment(tokens[:50], scores[:49])  # warm-up (numpy)
    t0 = time.perf_counter()
    blocks = segment(tokens, scores)
    elapsed = time.perf_counter() - t0
    _check_valid(blocks, tokens, 200, 900)
    assert elapsed < 1.5, elapsed  # typically ~0.2-0.4 s on 2 cores; margin for loaded CI machines


def test_real_trace_segmentation():
    if not TRACES.exists():
        pytest.skip(f"shared real traces not found at {TRACES}")
    counter = RegexTokenCounter()
    row = json.loads(TRACES.read_text(encoding="utf-8").splitlines()[2])
    thinking, _, _ = split_thinking(row["cot"])
    sentences = split_sentences(thinking, counter)
    tokens = [counter.count(s) for s in sentences]
    scores = heuristic_scores(sentences)
    blocks = segment(tokens, scores)
    _check_valid(blocks, tokens, 200, len(sentences))
    assert len(blocks) > 3
