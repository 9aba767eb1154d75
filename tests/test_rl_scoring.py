"""The trainer's masked forward: per-token log-probs of a padded batch equal a one-row dense forward
with `memento.masking.attention_mask` (the Stage-2 rule), and evicted blocks stay invisible."""

from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import block_stream, dense_logits, header, one_thread, sharp_model, text_ids  # noqa: F401
from memento.masking import BlockMaskingConfig, Eviction, evictions, kill_times
from memento.train.rl.scoring import build_batch, kill_times_from_evictions, response_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return sharp_model(toy_tokenizer, seed=3)


def make_rows(tokenizer, markers, config, count=4, seed=0):
    rng = random.Random(seed)
    words = text_ids(tokenizer, markers)
    rows = []
    for i in range(count):
        prompt = header(tokenizer, "Q" * (1 + 3 * i))  # prompts of different lengths
        response = block_stream(markers, words, rng, blocks=1 + i % 3)
        ids = prompt + response
        rows.append((prompt, response, evictions(ids, markers, config)))
    return rows


@pytest.mark.parametrize(
    "config",
    [
        BlockMaskingConfig(),
        BlockMaskingConfig(mask_delimiters=True),
        BlockMaskingConfig(keep_last_n_blocks=1),
    ],
    ids=["keep0", "mask_delimiters", "keep1"],
)
def test_kill_times_from_evictions_equal_masking_kill_times(toy_tokenizer, markers, config):
    for prompt, response, evs in make_rows(toy_tokenizer, markers, config):
        ids = prompt + response
        assert torch.equal(kill_times_from_evictions(len(ids), evs), kill_times(ids, markers, config))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_logprobs_equal_dense_reference_per_row(model, toy_tokenizer, markers, temperature):
    config = BlockMaskingConfig()
    rows = make_rows(toy_tokenizer, markers, config)
    assert len({len(p) for p, _, _ in rows}) > 1 and len({len(r) for _, r, _ in rows}) > 1
    assert all(evs for _, _, evs in rows)  # every row evicts something
    batch = build_batch(rows, toy_tokenizer.pad_token_id)
    with torch.no_grad():
        got = response_logprobs(model, batch, temperature)
    assert got.shape == (len(rows), max(len(r) for _, r, _ in rows))
    for b, (prompt, response, _) in enumerate(rows):
        logits = dense_logits(model, prompt + response, markers, config) / temperature
        ref = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(response)[:, None])[:, 0]
        assert torch.allclose(got[b, : len(response)], ref, atol=1e-5), b
        assert not got[b, len(response) :].any()


def test_a_scorer_that_ignores_evictions_would_differ(model, toy_tokenizer, markers):
    """Sanity: scoring the same rows without their evictions changes the log-probs after the first
    eviction, so the equality above really depends on the mask."""
    rows = make_rows(toy_tokenizer, markers, BlockMaskingConfig())
    blind = [(p, r, []) for p, r, _ in rows]
    with torch.no_grad():
        masked = response_logprobs(model, build_batch(rows, toy_tokenizer.pad_token_id))
        causal = response_logprobs(model, build_batch(blind, toy_tokenizer.pad_token_id))
    assert (masked - causal).abs().max() > 1e-2


def test_gradients_flow_and_restart_rollouts_are_refused(model, toy_tokenizer, markers):
    rows = make_rows(toy_tokenizer, markers, BlockMaskingConfig(), count=2)
    logp = response_logprobs(model, build_batch(rows, toy_tokenizer.pad_token_id))
    logp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="restart"):
        kill_times_from_evictions(10, [Eviction(5, 1, 3, recompute_from=4)])
