"""Stage-2 batches: the collator's mask is `memento.masking.attention_mask()` row by row, padding
is invisible, and the batched loss equals a hand-computed per-row masked forward loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memento.masking import BlockMaskingConfig, attention_mask
from memento.toy import build_tiny_model
from memento.train import MementoCollator, tokenize_trace, tokenize_traces
from memento.train.data import IGNORE_INDEX
from memento.train.flex import block_mask_from_kill_times, flex_available
from train_traces import count_trace, make_traces


@pytest.fixture(scope="module")
def samples(toy_tokenizer):
    # Different lengths so every row but the longest is padded.
    traces = [count_trace(1, 4), count_trace(5, 16, per_block=2), count_trace(3, 9), count_trace(2, 3)]
    return [tokenize_trace(t, toy_tokenizer) for t in traces]


@pytest.mark.parametrize(
    "masking",
    [
        BlockMaskingConfig(),
        BlockMaskingConfig(mask_delimiters=True),
        BlockMaskingConfig(keep_last_n_blocks=1),
    ],
    ids=["keep0", "mask_delimiters", "keep1"],
)
def test_stage2_mask_equals_attention_mask_per_row(samples, markers, toy_tokenizer, masking):
    batch = MementoCollator(toy_tokenizer.pad_token_id, "memento", markers, masking)(samples)
    mask = batch["attention_mask"]
    length = mask.shape[-1]
    assert mask.dtype == torch.bool and mask.shape == (len(samples), 1, length, length)
    assert any(len(s) < length for s in samples)
    for b, sample in enumerate(samples):
        n = len(sample)
        expected = attention_mask(sample.input_ids, markers, masking)
        assert not expected.all(dim=None) or n < 3  # the mask really evicts something
        assert torch.equal(mask[b, 0, :n, :n], expected)
        assert not mask[b, 0, :n, n:].any(), "a real query sees a padded key"
        assert not mask[b, 0, n:, :n].any(), "a padded query sees a real key"
        pad_rows = mask[b, 0, n:, n:]
        assert torch.equal(pad_rows, torch.eye(length - n, dtype=torch.bool)), "pad row must see itself only"
        assert torch.equal(batch["position_ids"][b], torch.arange(length))
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()


def test_stage1_batch_is_causal_with_padding_mask(samples, toy_tokenizer):
    batch = MementoCollator(toy_tokenizer.pad_token_id, "full", return_lengths=True)(samples)
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["lengths"].tolist() == [len(s) for s in samples]
    assert batch["attention_mask"].sum(1).tolist() == [len(s) for s in samples]


def test_stage2_needs_markers(toy_tokenizer):
    with pytest.raises(ValueError, match="marker"):
        MementoCollator(toy_tokenizer.pad_token_id, "memento")


def _manual_masked_loss(model, samples, markers) -> torch.Tensor:
    """Per-row forward with attention_mask() (no batching, no padding), manual cross-entropy."""
    total, count = torch.zeros(()), 0
    for s in samples:
        ids = torch.tensor([s.input_ids])
        mask = attention_mask(s.input_ids, markers)[None, None]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(len(s))[None]).logits[0]
        labels = torch.tensor(s.labels)
        keep = labels[1:] != IGNORE_INDEX
        total = total + F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def test_stage2_batch_loss_equals_hand_computed_masked_loss(samples, markers, toy_tokenizer):
    model = build_tiny_model(toy_tokenizer, layers=2, seed=3)
    batch = MementoCollator(toy_tokenizer.pad_token_id, "memento", markers)(samples)
    with torch.no_grad():
        batched = model(**batch).loss
        manual = _manual_masked_loss(model, samples, markers)
        causal = model(**MementoCollator(toy_tokenizer.pad_token_id, "full")(samples)).loss
    assert torch.isfinite(batched)
    assert torch.allclose(batched, manual, atol=1e-5), (batched, manual)
    assert not torch.allclose(batched, causal, atol=1e-4), "the Stage-2 mask changed nothing"


def test_padding_does_not_change_stage2_logits(samples, markers, toy_tokenizer):
    model = build_tiny_model(toy_tokenizer, layers=2, seed=4)
    collate = MementoCollator(toy_tokenizer.pad_token_id, "memento", markers)
    short = samples[0]
    with torch.no_grad():
        alone = model(**collate([short])).logits[0]
        padded = model(**collate(samples)).logits[0, : len(short)]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_flex_block_mask_forward_equals_dense(markers, toy_tokenizer):
    ok, why = flex_available()
    if not ok:
        pytest.skip(f"flex_attention unavailable: {why}")
    samples, _ = tokenize_traces(make_traces(3, seed=5), toy_tokenizer)
    collate_kill = MementoCollator(toy_tokenizer.pad_token_id, "memento", markers, mask_format="kill_times")
    collate_dense = MementoCollator(toy_tokenizer.pad_token_id, "memento", markers)
    dense_batch, kill_batch = collate_dense(samples), collate_kill(samples)
    block_mask = block_mask_from_kill_times(kill_batch.pop("kill_times"), block_size=16)
    # Its mask_mod, evaluated everywhere, is exactly the dense mask (padding included).
    length = dense_batch["input_ids"].shape[1]
    b, q, k = torch.arange(len(samples))[:, None, None], torch.arange(length)[:, None], torch.arange(length)
    assert torch.equal(block_mask.mask_mod(b, 0, q, k), dense_batch["attention_mask"][:, 0])
    model = build_tiny_model(toy_tokenizer, layers=2, seed=5, attn_implementation="sdpa")
    with torch.no_grad():
        dense = model(**dense_batch).logits
        try:
            model.set_attn_implementation("flex_attention")
            flex = model(**kill_batch, attention_mask=block_mask).logits
        except Exception as exc:  # e.g. no C++ compiler for torch.compile on CPU
            pytest.skip(f"flex_attention forward not runnable on this CPU: {type(exc).__name__}: {exc}")
    for b, s in enumerate(samples):
        n = len(s)
        assert torch.allclose(flex[b, :n], dense[b, :n], atol=1e-4), (flex[b, :n] - dense[b, :n]).abs().max()


def test_chunked_sdpa_equals_plain_sdpa_forward_and_backward(samples, markers, toy_tokenizer, monkeypatch):
    from memento import hf

    monkeypatch.setattr(hf, "CHUNK", 16)  # several chunks at these lengths
    batch = MementoCollator(toy_tokenizer.pad_token_id, "memento", markers)(samples)
    assert batch["input_ids"].shape[1] > 3 * hf.CHUNK
    plain = build_tiny_model(toy_tokenizer, layers=2, seed=6).train()
    chunked = build_tiny_model(toy_tokenizer, layers=2, seed=6).train()
    chunked.set_attn_implementation(hf.register_attention())
    loss_plain, loss_chunked = plain(**batch).loss, chunked(**batch).loss
    loss_plain.backward()
    loss_chunked.backward()
    assert torch.allclose(loss_plain, loss_chunked, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
