"""The incremental engine API a server drives: requests added between steps, aborted mid-run,
per-request mode/masking, and cutting (not raising) when one request alone outgrows the budget."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import header, one_thread, sharp_model  # noqa: F401 (fixture)
from memento.engine import Engine, SamplingParams
from memento.engine.scheduler import BudgetError
from memento.masking import BlockMaskingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return sharp_model(toy_tokenizer, seed=2)


class ForceBlocks:
    """Force a block + memento every 8 tokens so evictions happen on a random model."""

    def __init__(self, markers) -> None:
        m = markers
        self.pattern = [m.block_start, None, None, m.block_end, m.summary_start, None, m.summary_end, None]
        self.markers = list(m.block_markers)

    def __call__(self, seq, logits: torch.Tensor) -> torch.Tensor:
        token = self.pattern[len(seq.output_ids) % len(self.pattern)]
        logits = logits.clone()
        if token is None:
            logits[self.markers] -= 1e4
        else:
            logits[token] += 1e4
        return logits


def _drain(engine: Engine) -> None:
    while engine.has_work:
        engine.step()


def test_requests_joining_mid_run_match_generate(model, toy_tokenizer, markers):
    """A request added while others are decoding gets the same tokens as in a one-shot generate."""
    hook = ForceBlocks(markers)
    prompts = [header(toy_tokenizer, f"question {i}") for i in range(3)]
    params = SamplingParams(temperature=0.8, max_new_tokens=20, seed=3)
    reference = Engine(model, toy_tokenizer, logits_hook=hook).generate(prompts, params)
    engine = Engine(model, toy_tokenizer, logits_hook=hook)
    seqs = [engine.add_request(prompts[0], params)]
    streamed: dict[int, list[int]] = {0: []}
    for step in range(30):
        if step in (4, 9):
            seqs.append(engine.add_request(prompts[len(seqs)], params, prompt_index=len(seqs)))
            streamed[len(seqs) - 1] = []
        for seq in engine.step():
            streamed[seq.prompt_index].append(seq.tokens[-1])
    _drain(engine)
    for ref, seq in zip(reference, seqs, strict=True):
        assert engine.output(seq).output_ids == ref.output_ids
        assert streamed[seq.prompt_index] == ref.output_ids[: len(streamed[seq.prompt_index])]
    assert engine.cache.total_tokens() == 0 and engine.num_evictions > 0


def test_abort_frees_kv_at_once(model, toy_tokenizer, markers):
    engine = Engine(model, toy_tokenizer, kv_budget_tokens=200, max_batch_size=4)
    params = SamplingParams(temperature=0, max_new_tokens=50)
    seqs = [engine.add_request(header(toy_tokenizer, f"q{i}"), params, prompt_index=i) for i in range(6)]
    for _ in range(5):
        engine.step()
    running = [s for s in seqs if s.row is not None]
    waiting = [s for s in seqs if s in engine.scheduler.waiting]
    assert running and waiting
    before = engine.cache.total_tokens()
    engine.abort(running[0])
    assert engine.cache.total_tokens() == before - running[0].cached
    engine.abort(waiting[-1])
    assert running[0].finish_reason == waiting[-1].finish_reason == "abort"
    _drain(engine)
    assert engine.cache.total_tokens() == 0
    finished = [s for s in seqs if s.finish_reason in ("stop", "length")]
    assert len(finished) == 4
    engine.abort(finished[0])  # finished requests are left alone
    assert finished[0].finish_reason in ("stop", "length")


def test_per_request_mode_and_masking(model, toy_tokenizer, markers):
    hook = ForceBlocks(markers)
    engine = Engine(model, toy_tokenizer, mode="memento", logits_hook=hook)
    prompt = header(toy_tokenizer, "same")
    params = SamplingParams(temperature=0, max_new_tokens=24)
    evicting = engine.add_request(prompt, params)
    full = engine.add_request(prompt, params, mode="full")
    keep1 = engine.add_request(prompt, params, masking=BlockMaskingConfig(keep_last_n_blocks=1))
    _drain(engine)
    assert len(evicting.tracker.evictions) == 3 and full.tracker.evictions == []
    assert len(keep1.tracker.evictions) == 2
    assert max(evicting.kv_trace) < max(keep1.kv_trace) < max(full.kv_trace)
    alone = Engine(model, toy_tokenizer, mode="full", logits_hook=hook).generate([prompt], params)[0]
    assert engine.output(full).output_ids == alone.output_ids


def test_budget_errors_and_cut_at_budget(model, toy_tokenizer):
    prompt = header(toy_tokenizer, "a long enough question for this budget")
    engine = Engine(model, toy_tokenizer, mode="full", kv_budget_tokens=len(prompt) + 5)
    with pytest.raises(BudgetError, match="kv_budget_tokens"):
        engine.add_request(prompt + prompt, SamplingParams())
    assert not engine.has_work  # nothing was queued
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=50))
    with pytest.raises(BudgetError, match="alone needs"):
        _drain(engine)
    engine = Engine(model, toy_tokenizer, mode="full", kv_budget_tokens=len(prompt) + 5)
    engine.cut_at_budget = True
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=50))
    _drain(engine)
    out = engine.output(seq)
    # the k-th token is sampled with prompt + k - 1 tokens cached: 6 fit in prompt + 5
    assert out.finish_reason == "length" and len(out.output_ids) == 6 and out.peak_kv == len(prompt) + 5
    assert engine.cache.total_tokens() == 0


def test_generate_refused_while_serving(model, toy_tokenizer):
    engine = Engine(model, toy_tokenizer)
    engine.add_request(header(toy_tokenizer), SamplingParams(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="serving requests"):
        engine.generate([header(toy_tokenizer)])
    _drain(engine)
    assert len(engine.generate([header(toy_tokenizer)], SamplingParams(max_new_tokens=3))) == 1
