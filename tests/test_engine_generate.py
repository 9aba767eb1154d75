"""Generation through the engine: greedy equals the dense masked argmax, batching and preemption
change nothing, the live KV trace equals the offline accounting, and the budget holds."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from engine_helpers import (
    dense_logits,
    header,
    one_thread,  # noqa: F401 (fixture)
    sharp_model,
    text_ids,
)
from memento.engine import Engine, SamplingParams
from memento.kv import kv_stats
from memento.masking import BlockMaskingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return sharp_model(toy_tokenizer, seed=2)


class ForceMarkers:
    """Logits hook that forces a block structure at given output indices (a random model never
    writes well-formed blocks itself); elsewhere markers are suppressed and the token is the
    model's own choice."""

    def __init__(self, markers, period: int, offset: int = 0) -> None:
        m = markers
        pattern = [m.block_start, None, None, None, m.block_end, m.summary_start, None, m.summary_end]
        pattern += [None] * (period - len(pattern))
        self.pattern, self.period, self.offset = pattern, period, offset
        self.markers = list(m.block_markers)

    def bias(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        token = self.pattern[(index + self.offset) % self.period]
        logits = logits.clone()
        if token is None:
            logits[self.markers] -= 1e4
        else:
            logits[token] += 1e4
        return logits

    def __call__(self, seq, logits):
        return self.bias(len(seq.output_ids), logits)


def _prompts(tokenizer, count: int) -> list[list[int]]:
    return [header(tokenizer, f"problem number {i}") for i in range(count)]


def _assert_greedy_matches_dense(model, out, markers, config, hook):
    ids = out.token_ids
    ref = dense_logits(model, ids, markers, config)
    for i, token in enumerate(out.output_ids):
        row = hook.bias(i, ref[out_len := len(out.prompt_ids) + i - 1])
        top2 = torch.topk(row, 2)
        if int(top2.indices[0]) != token:
            # only a numerical near-tie may flip
            assert float(top2.values[0] - top2.values[1]) < 1e-4 and int(top2.indices[1]) == token, (
                i,
                out_len,
            )


@pytest.mark.parametrize(
    "config",
    [BlockMaskingConfig(), BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True)],
    ids=["keep0", "keep1-md"],
)
def test_greedy_single_equals_dense_argmax(model, toy_tokenizer, markers, config):
    hook = ForceMarkers(markers, period=11)
    engine = Engine(model, toy_tokenizer, masking=config, logits_hook=hook)
    (out,) = engine.generate(_prompts(toy_tokenizer, 1), SamplingParams(temperature=0, max_new_tokens=60))
    assert len(out.evictions) >= 4
    _assert_greedy_matches_dense(model, out, markers, config, hook)


def test_continuous_batching_with_preemption(model, toy_tokenizer, markers):
    """Mixed lengths and eviction times, more requests than rows, and a budget that preempts:
    every output equals its dense greedy definition and equals the request run alone."""
    config = BlockMaskingConfig()
    hooks = {}

    def hook(seq, logits):
        if seq.prompt_index not in hooks:
            i = seq.prompt_index
            hooks[i] = ForceMarkers(markers, period=10 + i % 3, offset=i)
        return hooks[seq.prompt_index](seq, logits)

    prompts = _prompts(toy_tokenizer, 6)
    params = [SamplingParams(temperature=0, max_new_tokens=20 + 5 * i) for i in range(6)]
    engine = Engine(
        model, toy_tokenizer, masking=config, logits_hook=hook, kv_budget_tokens=90, max_batch_size=4
    )
    outs = engine.generate(prompts, params)
    assert [(o.prompt_index, o.sample) for o in outs] == [(i, 0) for i in range(6)]
    assert engine.last_run["preemptions"] > 0
    assert engine.last_run["peak_total_kv"] <= 90
    assert sum(o.num_preemptions for o in outs) == engine.last_run["preemptions"]
    for out in outs:
        assert len(out.output_ids) == params[out.prompt_index].max_new_tokens
        _assert_greedy_matches_dense(model, out, markers, config, hooks[out.prompt_index])
        assert out.kv_trace == kv_stats(out.token_ids, markers, config, len(out.prompt_ids)).trace
    alone = Engine(model, toy_tokenizer, masking=config, logits_hook=hook, max_batch_size=1)
    singles = alone.generate(prompts, params)  # one request at a time, no budget
    assert [o.output_ids for o in singles] == [o.output_ids for o in outs]


def test_full_mode_trace_is_a_ramp(model, toy_tokenizer, markers):
    hook = ForceMarkers(markers, period=9)
    engine = Engine(model, toy_tokenizer, mode="full", logits_hook=hook)
    (out,) = engine.generate(_prompts(toy_tokenizer, 1), SamplingParams(temperature=0, max_new_tokens=25))
    assert out.evictions == []
    assert out.kv_trace == list(range(len(out.prompt_ids), len(out.token_ids)))
    assert out.peak_kv == len(out.token_ids) - 1
    _assert_greedy_matches_dense(model, out, markers, BlockMaskingConfig.full(), hook)


@pytest.mark.parametrize("mode", ["memento", "restart"])
def test_sampled_batch_equals_one_by_one_and_trace_matches_offline(model, toy_tokenizer, markers, mode):
    hook = ForceMarkers(markers, period=12)
    params = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, max_new_tokens=25, seed=123, n=2
    )
    prompts = _prompts(toy_tokenizer, 3)
    engine = Engine(model, toy_tokenizer, mode=mode, logits_hook=hook, max_batch_size=8)
    batched = engine.generate(prompts, params)
    assert [(o.prompt_index, o.sample) for o in batched] == [(i, k) for i in range(3) for k in range(2)]
    assert batched[0].output_ids != batched[1].output_ids  # samples differ (seeds 123, 124)
    for out in batched:
        assert out.kv_trace == kv_stats(out.token_ids, markers, engine.config, len(out.prompt_ids)).trace
        assert out.peak_kv == max(out.kv_trace) and out.auc_kv == sum(out.kv_trace)
    one = Engine(model, toy_tokenizer, mode=mode, logits_hook=hook, max_batch_size=1)
    for i, prompt in enumerate(prompts):
        for out in one.generate([prompt], params):
            assert out.output_ids == batched[2 * i + out.sample].output_ids


def test_budget_never_exceeded_no_request_lost(model, toy_tokenizer, markers):
    rng = random.Random(0)
    hook = ForceMarkers(markers, period=9)
    prompts = _prompts(toy_tokenizer, 8)
    params = [SamplingParams(temperature=1.0, max_new_tokens=rng.randint(5, 25), seed=i) for i in range(8)]
    for budget in (60, 150):
        engine = Engine(model, toy_tokenizer, logits_hook=hook, kv_budget_tokens=budget, max_batch_size=6)
        sizes = []
        real_execute = engine._execute_many

        def spy(items, real_execute=real_execute, engine=engine, sizes=sizes):
            peak = real_execute(items)  # every cache op: batched prefill, evictions, recomputes
            sizes.extend([engine.cache.total_tokens(), peak])  # peak: after each forward inside
            return peak

        engine._execute_many = spy
        outs = engine.generate(prompts, params)
        assert sorted((o.prompt_index, o.sample) for o in outs) == [(i, 0) for i in range(8)]
        assert max(sizes) <= budget and engine.last_run["peak_total_kv"] <= budget
        for o in outs:
            assert len(o.output_ids) == params[o.prompt_index].max_new_tokens or o.finish_reason == "stop"


def test_budget_too_small_is_a_clear_error(model, toy_tokenizer):
    engine = Engine(model, toy_tokenizer, kv_budget_tokens=5)
    with pytest.raises(RuntimeError, match="kv_budget_tokens"):
        engine.generate(_prompts(toy_tokenizer, 1), SamplingParams(max_new_tokens=3))


def test_sampling_controls(model, toy_tokenizer, markers):
    engine = Engine(model, toy_tokenizer)
    prompt = _prompts(toy_tokenizer, 1)
    greedy = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=15))[0]
    top1 = engine.generate(prompt, SamplingParams(temperature=2.0, top_k=1, max_new_tokens=15, seed=5))[0]
    assert top1.output_ids == greedy.output_ids
    a = engine.generate(prompt, SamplingParams(max_new_tokens=15, seed=9))[0]
    b = engine.generate(prompt, SamplingParams(max_new_tokens=15, seed=9))[0]
    assert a.output_ids == b.output_ids and a.seed == 9
    words = text_ids(toy_tokenizer, markers)
    stop = engine.generate(
        prompt, SamplingParams(temperature=0, max_new_tokens=15, stop_token_ids=(greedy.output_ids[3],))
    )[0]
    assert (
        stop.finish_reason == "stop"
        and stop.output_ids == greedy.output_ids[: greedy.output_ids.index(greedy.output_ids[3]) + 1]
    )
    assert words  # the helper sees ordinary tokens
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_block_length_cap_forces_block_end(model, toy_tokenizer, markers):
    config = BlockMaskingConfig(max_block_tokens=3)

    def open_block(seq, logits):
        logits = logits.clone()
        if len(seq.output_ids) == 0:
            logits[markers.block_start] += 1e4
        else:  # the model itself writes no markers: only the cap can close the block
            logits[list(markers.block_markers)] -= 1e4
        return logits

    engine = Engine(model, toy_tokenizer, masking=config, logits_hook=open_block)
    (out,) = engine.generate(_prompts(toy_tokenizer, 1), SamplingParams(temperature=0, max_new_tokens=8))
    assert out.output_ids[0] == markers.block_start
    assert out.output_ids[4] == markers.block_end


def test_warns_without_assistant_header(model, toy_tokenizer):
    engine = Engine(model, toy_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate(["plain text prompt"], SamplingParams(max_new_tokens=2, seed=0))
    assert any("assistant" in str(w.message) for w in caught)


def test_from_pretrained_and_chat_prompt(toy_model_dir):
    engine = Engine.from_pretrained(toy_model_dir, mode="memento")
    prompt = engine.chat_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    (out,) = engine.generate([prompt], SamplingParams(max_new_tokens=5, seed=1))
    assert len(out.output_ids) <= 5 and out.tokens_per_s > 0 and isinstance(out.text, str)


def test_batched_sampling_equals_row_by_row():
    """The sampling filters run batched over rows sharing their params; every row still draws
    exactly what it would alone from its own generator."""
    from memento.engine.sampling import make_generator, sample_rows, sample_token

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    for params in (
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02),
        SamplingParams(top_p=0.5),
    ):
        for _ in range(3):
            batched = sample_rows(logits, params, [make_generator(s)[0] for s in range(5)])[0].tolist()
            alone = [sample_token(logits[s], params, make_generator(s)[0]) for s in range(5)]
            assert batched == alone
            logits = logits.roll(7, dims=-1)
