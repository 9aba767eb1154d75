"""vLLM + plugin vs our own engine (`memento.engine.Engine`), and several evictions in one step.

Both engines get the same prompt, the same forced marker tokens (vLLM: `ForcedTokensProcessor`;
ours: a `logits_hook`) and greedy sampling, so the generated ids must be identical and the
log-probs of every non-forced token must agree within 1e-4: two independent implementations of
the same block semantics (paged compaction in vLLM, a padded per-row cache in ours).
"""

from __future__ import annotations

import pytest

from conftest import HAVE_VLLM, SKIP_REASON

if not HAVE_VLLM:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import torch  # noqa: E402
from _parity import THREE_BLOCKS, assert_same, block_script, header, make_llm, run_ours, run_vllm  # noqa: E402
from _toy import HFReference  # noqa: E402

from memento.masking import BlockMaskingConfig, evictions  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def llm(model_dir):
    """One engine for the module (a second `LLM` in one process breaks the first)."""
    engine = make_llm(model_dir)
    yield engine
    del engine


CASES = {
    # name: (engine mode, masking, per-request vLLM overrides, blocks, max_tokens)
    "keep0": ("memento", BlockMaskingConfig(), {}, THREE_BLOCKS[:2], 100),
    "keep1": (
        "memento",
        BlockMaskingConfig(keep_last_n_blocks=1),
        {"keep_last_n_blocks": 1},
        THREE_BLOCKS,
        125,
    ),
    "keep0_mask_delimiters": (
        "memento",
        BlockMaskingConfig(mask_delimiters=True),
        {"mask_delimiters": True},
        THREE_BLOCKS[:2],
        100,
    ),
    "restart": ("restart", BlockMaskingConfig(), {"restart_mode": True}, THREE_BLOCKS[:2], 100),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tokens_equal_our_engine(name, llm, model_dir, tokenizer, markers):
    """Two prompts of different lengths per case, batched in both engines."""
    mode, masking, overrides, blocks, n = CASES[name]
    script = block_script(markers, blocks)
    prompts = [header(tokenizer), header(tokenizer, "What is 12 times 7?")]
    requests = [(p, overrides, script, n) for p in prompts]
    vouts = run_vllm(llm, requests)
    ours, logits = run_ours(model_dir, mode, masking, requests)
    for k in range(len(requests)):
        assert_same(vouts[k], ours[k], logits[k], script, f"{name}[{k}]")
        ids = prompts[k] + list(ours[k].output_ids)
        assert ours[k].evictions == evictions(
            ids, markers, masking if mode != "restart" else BlockMaskingConfig(restart_mode=True)
        )
        assert len(ours[k].evictions) == len(blocks) - masking.keep_last_n_blocks


def test_several_evictions_in_one_step(llm, tokenizer, markers, model_dir):
    """Rows of one batch that hit a summary end at the same step are compacted in the same
    `schedule()` call (≥2 evictions, different requests, one step); a third row evicts at other
    steps. Outputs equal each row run alone, our engine's, and the HF dense-mask reference."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    script = block_script(markers, THREE_BLOCKS[:2])
    late = block_script(markers, [(3, 50, 53), (55, 80, 84)])  # evicts at other steps
    prompts = [header(tokenizer), header(tokenizer, "What is 12 times 7?"), header(tokenizer, "Add 5 and 9.")]
    requests = [(prompts[0], {}, script, 100), (prompts[1], {}, script, 100), (prompts[2], {}, late, 100)]
    alone = [run_vllm(llm, [r])[0] for r in requests]

    per_step: list[list[dict]] = []
    original = sched.schedule

    def recording_schedule(*args, **kwargs):
        start = len(sched.memento_log)
        out = original(*args, **kwargs)
        per_step.append(sched.memento_log[start:])
        return out

    sched.schedule = recording_schedule
    try:
        batched = run_vllm(llm, requests)
    finally:
        del sched.schedule
    evict_steps = [[e for e in step if e["event"] == "evict"] for step in per_step]
    multi = [step for step in evict_steps if len({e["request_id"] for e in step}) >= 2]
    assert len(multi) == 2, evict_steps  # both shared summary ends land in one step each
    assert all(len(step) == 2 for step in multi)
    assert sum(len(step) for step in evict_steps) == 6  # 2 + 2 + 2 evictions in all

    ours, logits = run_ours(model_dir, "memento", BlockMaskingConfig(), requests)
    reference = HFReference(model_dir, markers)
    for k, (prompt, _, s, _) in enumerate(requests):
        assert list(batched[k].token_ids) == list(alone[k].token_ids), k
        assert_same(batched[k], ours[k], logits[k], s, f"row {k}")
        ids = prompt + list(batched[k].token_ids)
        lp = reference.logprobs(ids, BlockMaskingConfig())
        for i, token in enumerate(batched[k].token_ids):
            assert abs(batched[k].logprobs[i][token].logprob - lp[len(prompt) - 1 + i, token].item()) <= TOL
            if i not in s:
                assert int(lp[len(prompt) - 1 + i].argmax()) == token, (k, i)


def test_restart_two_evictions_at_one_trigger(llm, model_dir, tokenizer, markers):
    """Regression (review bug 3): with `keep_last_block_for_answer`, the next `<|block_start|>`
    flushes two pending blocks at once; in restart mode the plugin kept the later summary start as
    the rewind point while the KV was cut at the earlier one (stale KV read). It now rewinds to the
    earliest, like our engine (docs/masking.md): same tokens, same log-probs, same as the HF
    reference."""
    m = markers
    # block 0, block 1, then two summaries (block 1's, then block 0's), then a new block; every
    # other token is forced text too, so the random model cannot add markers of its own
    words = tokenizer.encode(" one two three four five six seven", add_special_tokens=False)
    script = {i: words[i % len(words)] for i in range(46)}
    script |= {1: m.block_start, 8: m.block_end, 10: m.block_start, 17: m.block_end}
    script |= {18: m.summary_start, 22: m.summary_end, 23: m.summary_start, 27: m.summary_end}
    script |= {29: m.block_start, 36: m.block_end, 37: m.summary_start, 40: m.summary_end}
    masking = BlockMaskingConfig(keep_last_block_for_answer=True)
    overrides = {"restart_mode": True, "keep_last_block_for_answer": True}
    requests = [(header(tokenizer), overrides, script, 46)]
    (vout,) = run_vllm(llm, requests)
    (ours,), (logits,) = run_ours(model_dir, "restart", masking, requests)
    triggers = [e.trigger for e in ours.evictions]
    assert len(triggers) > len(set(triggers)), ours.evictions  # two evictions share a trigger
    assert list(vout.token_ids) == list(ours.output_ids)
    for i, token in enumerate(vout.token_ids):  # every token forced: compare the raw log-probs
        ref = torch.log_softmax(logits[i], dim=-1)[token].item()
        assert abs(vout.logprobs[i][token].logprob - ref) <= TOL, (i, vout.logprobs[i][token].logprob, ref)
    ids = requests[0][0] + list(vout.token_ids)
    restart = BlockMaskingConfig(restart_mode=True, keep_last_block_for_answer=True)
    lp = HFReference(model_dir, markers).logprobs(ids, restart)
    n = len(requests[0][0])
    for i, token in enumerate(vout.token_ids):
        assert abs(vout.logprobs[i][token].logprob - lp[n - 1 + i, token].item()) <= TOL, i


def test_bad_request_options_are_refused_and_the_engine_keeps_serving(llm, tokenizer):
    """Regression (review bug 4): a request with bad MEMENTO options raised *after* vLLM queued it,
    so it stayed in `waiting` and took the engine down with the next request. It is refused at
    admission (`VLLMValidationError`, HTTP 400 in the server), nothing is queued, the next request runs;
    options may also come as a JSON string (what `vllm_xargs` can carry over HTTP)."""
    from vllm.exceptions import VLLMValidationError  # what the server turns into HTTP 400

    from vllm import SamplingParams

    sched = llm.llm_engine.engine_core.engine_core.scheduler
    prompt = [{"prompt_token_ids": header(tokenizer)}]
    for bad in ({"keep_last_n_block": 1}, {"keep_last_n_blocks": -5}, "{not json"):
        with pytest.raises(VLLMValidationError, match="keep_last_n_block|JSON"):
            llm.generate(prompt, SamplingParams(max_tokens=3, extra_args={"memento": bad}), use_tqdm=False)
        assert not sched.waiting and not sched.running
    good = SamplingParams(max_tokens=3, ignore_eos=True, extra_args={"memento": '{"keep_last_n_blocks": 1}'})
    (out,) = llm.generate(prompt, good, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3


def test_scheduler_validates_before_queueing():
    """The scheduler's own guard (for callers that bypass the front end's check): a bad request
    raises before vLLM's `add_request`, so nothing is left in `waiting`."""
    from types import SimpleNamespace

    from memento.integrations.vllm.config import MementoVllmConfig
    from memento.integrations.vllm.scheduler import MementoSchedulerMixin

    class Queue:
        def add_request(self, request):
            self.waiting.append(request)

    sched = object.__new__(type("S", (MementoSchedulerMixin, Queue), {}))
    sched.waiting, sched._mstates = [], {}
    sched.memento_config = MementoVllmConfig.from_dict({})
    bad = SimpleNamespace(request_id="r1", sampling_params=SimpleNamespace(extra_args={"memento": {"x": 1}}))
    with pytest.raises(ValueError, match="unknown per-request memento option"):
        sched.add_request(bad)
    assert sched.waiting == []
