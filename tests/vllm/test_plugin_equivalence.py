"""vLLM + memento plugin vs the HF dense-mask reference on a sharp tiny Qwen3 (fp32, greedy).

A logits processor forces scripted marker tokens at chosen steps, so the real token-triggered
eviction path runs with a random model. For every generated token: the greedy choice equals the
reference's argmax (teacher-forced, Stage-2 mask, original position ids) and the log-prob is
within 1e-4. One `LLM` is shared by the module; cases differ through per-request overrides.
"""

from __future__ import annotations

import pytest

from conftest import HAVE_VLLM, SKIP_REASON

if not HAVE_VLLM:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import torch  # noqa: E402
from _toy import HFReference  # noqa: E402

from memento.integrations.vllm import CPU_WORKER_CLS, SCHEDULER_CLS  # noqa: E402
from memento.integrations.vllm.logits import FORCE_KEY  # noqa: E402
from memento.masking import BlockMaskingConfig, evictions  # noqa: E402
from memento.tokens import MarkerIds  # noqa: E402

TOL = 1e-4
BLOCK = 32


@pytest.fixture(scope="module")
def reference(model_dir, markers):
    return HFReference(model_dir, markers)


def make_llm(model_dir, **kwargs):
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        dtype="float32",
        block_size=BLOCK,
        enable_prefix_caching=False,
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=16,
        seed=0,
        scheduler_cls=SCHEDULER_CLS,
        worker_cls=CPU_WORKER_CLS,
        logits_processors=[
            "memento.integrations.vllm.logits:ForcedTokensProcessor",
            "memento.integrations.vllm.logits:BlockLengthCapProcessor",
        ],
        additional_config={"memento": {"keep_last_n_blocks": 0, "debug": True}},
        kv_cache_memory_bytes=16 << 20,
    )
    args.update(kwargs)
    return LLM(**args)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = make_llm(model_dir)
    yield engine
    del engine


def scheduler_of(llm):
    """The in-process scheduler (tests run with VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def header(tokenizer) -> list[int]:
    text = "<|im_start|>user\nCompute 47 + 38 step by step.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    return tokenizer.encode(text, add_special_tokens=False)


def block_script(m: MarkerIds, blocks: list[tuple[int, int, int]], start: int = 0) -> dict[int, int]:
    """Force BS at b, BE at e, SS at e+1, SE at s (output indices, shifted by `start`)."""
    script = {}
    for b, e, s in blocks:
        script.update({start + b: m.block_start, start + e: m.block_end, start + e + 1: m.summary_start})
        script[start + s] = m.summary_end
    return script


# Long blocks (~40 tokens) so that evictions free whole 32-token KV blocks, which are re-allocated
# as the request grows again.
THREE_BLOCKS = [(1, 40, 44), (46, 85, 89), (91, 110, 113)]


def cases(m: MarkerIds) -> dict[str, tuple[dict, dict[int, int], int]]:
    """name -> (per-request memento overrides, forced-token script, max_tokens)."""
    two = block_script(m, THREE_BLOCKS[:2])
    three = block_script(m, THREE_BLOCKS)
    return {
        "plain_no_markers": ({}, {}, 60),
        "keep0": ({}, two, 100),
        "keep0_mask_delimiters": ({"mask_delimiters": True}, two, 100),
        "keep1": ({"keep_last_n_blocks": 1}, three, 125),
        "keep_last_block_for_answer": ({"keep_last_block_for_answer": True}, three, 125),
        "keep_minus1": ({"keep_last_n_blocks": -1}, two, 100),
    }


def run(llm, prompts_and_params):
    from vllm import SamplingParams

    inputs, params = [], []
    for prompt, overrides, script, max_tokens in prompts_and_params:
        inputs.append({"prompt_token_ids": prompt})
        params.append(
            SamplingParams(
                temperature=0.0,
                max_tokens=max_tokens,
                ignore_eos=True,
                logprobs=1,
                extra_args={"memento": overrides, FORCE_KEY: {str(k): v for k, v in script.items()}},
            )
        )
    return llm.generate(inputs, params, use_tqdm=False)


def check_against_reference(reference, markers, prompt, output, overrides, script, base=None):
    """Greedy tokens and log-probs vs the HF reference; returns the first position where the
    unmasked causal reference would disagree (None if never), to show the test has power."""
    cfg = BlockMaskingConfig.from_dict({**(base or {"keep_last_n_blocks": 0}), **overrides})
    out_ids = list(output.token_ids)
    ids = list(prompt) + out_ids
    lp = reference.logprobs(ids, cfg)
    causal = reference.logprobs(ids, None)
    p = len(prompt)
    first_diff = None
    for i, token in enumerate(out_ids):
        row = lp[p - 1 + i]
        got = output.logprobs[i][token].logprob
        assert abs(got - row[token].item()) <= TOL, (i, got, row[token].item())
        if i not in script:
            assert int(row.argmax()) == token, f"step {i}: vLLM {token} vs reference {int(row.argmax())}"
        if first_diff is None and abs(causal[p - 1 + i, token].item() - row[token].item()) > 1e-3:
            first_diff = i
    return first_diff, evictions(ids, markers, cfg)


def test_cases_single_then_batched(llm, tokenizer, markers, reference):
    prompt = header(tokenizer)
    table = cases(markers)
    outputs = {}
    for name, (overrides, script, n) in table.items():  # one request at a time
        outputs[name] = run(llm, [(prompt, overrides, script, n)])[0].outputs[0]
    batched = run(llm, [(prompt, o, s, n) for o, s, n in table.values()])  # rows evict at different steps
    for (name, (overrides, script, _)), request_output in zip(table.items(), batched, strict=True):
        single = outputs[name]
        both = request_output.outputs[0]
        assert list(both.token_ids) == list(single.token_ids), name
        first_diff, evs = check_against_reference(reference, markers, prompt, single, overrides, script)
        check_against_reference(reference, markers, prompt, both, overrides, script)
        if name in ("plain_no_markers", "keep_minus1"):
            assert not evs
        else:
            assert evs, name
            assert first_diff is not None and first_diff >= min(ev.trigger for ev in evs) - len(prompt), name


def test_prompt_resident_blocks(llm, tokenizer, markers, reference):
    """Two completed blocks inside the prompt's assistant part: both evicted during prefill (chunks
    end at their triggers), then generation continues as if it had produced them."""
    m = markers
    body = tokenizer.encode(" We add the units first. 7 + 8 = 15 and we carry 1.", add_special_tokens=False)
    prompt = header(tokenizer)
    for _ in range(2):
        prompt += [m.block_start, *body, *body, m.block_end, m.summary_start, *body[:4], m.summary_end]
    script = block_script(m, [(2, 38, 41)])
    output = run(llm, [(prompt, {}, script, 60)])[0].outputs[0]
    cfg_evs = evictions(prompt, m, BlockMaskingConfig())
    assert len(cfg_evs) == 2 and all(ev.trigger < len(prompt) for ev in cfg_evs)
    first_diff, evs = check_against_reference(reference, m, prompt, output, {}, script)
    assert len(evs) == 3 and first_diff == 0  # already the first token differs from causal


def test_restart_mode(llm, tokenizer, markers, reference):
    prompt = header(tokenizer)
    script = block_script(markers, THREE_BLOCKS[:2])
    overrides = {"restart_mode": True}
    output = run(llm, [(prompt, overrides, script, 100)])[0].outputs[0]
    first_diff, evs = check_against_reference(reference, markers, prompt, output, overrides, script)
    assert len(evs) == 2 and all(ev.recompute_from is not None for ev in evs)
    assert first_diff is not None


def test_kv_blocks_sawtooth_and_no_leak(llm, tokenizer, markers):
    """Blocks held by a request drop at each eviction and grow again; all return at the end."""
    sched = scheduler_of(llm)
    pool = sched.kv_cache_manager.block_pool
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    free_before = pool.get_num_free_blocks()
    held: list[int] = []
    original = sched.schedule

    def recording_schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        held.append(sum(len(b) for b in manager.req_to_blocks.values()))
        return out

    sched.schedule = recording_schedule
    try:
        prompt = header(tokenizer)
        run(llm, [(prompt, {}, block_script(markers, THREE_BLOCKS), 125)])
    finally:
        del sched.schedule
    drops = [i for i in range(1, len(held)) if held[i] < held[i - 1] and held[i] > 0]
    assert len(drops) >= 2, held  # a sawtooth, not a ramp
    assert max(held) <= 4, held  # a vanilla run would need ceil((26 + 125) / 32) = 5 blocks
    assert pool.get_num_free_blocks() == free_before
    assert not sched._mstates


def test_pool_usage_equals_memento_kv_prediction(llm, tokenizer, markers):
    """vLLM's own block accounting (the number behind `vllm:kv_cache_usage_perc`) equals what
    `memento.kv` predicts from the token stream alone, at every step, at vLLM's block granularity
    (a block is held while any of its slots is). The full check over many structures:
    benchmarks/kv_validation.py."""
    from memento.kv import kv_occupancy, paged_blocks

    sched = scheduler_of(llm)
    pool = sched.kv_cache_manager.block_pool.num_gpu_blocks - 1  # the gauge leaves out the null block
    used: list[int] = []
    original = sched.schedule

    def schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        if out.num_scheduled_tokens:
            used.append(round(sched.kv_cache_manager.usage * pool))
        return out

    sched.schedule = schedule
    try:
        prompt = header(tokenizer)
        for name, (overrides, script, max_tokens) in cases(markers).items():
            used.clear()
            out = run(llm, [(prompt, overrides, script, max_tokens)])[0]
            ids = prompt + list(out.outputs[0].token_ids)
            config = BlockMaskingConfig.from_dict({"keep_last_n_blocks": 0, **overrides})
            held = kv_occupancy(ids, markers, config)
            steps = [held[len(prompt) - 1], *held[len(prompt) : len(ids) - 1]]  # prefill, then decodes
            assert used == [paged_blocks(t, BLOCK) for t in steps], name
    finally:
        del sched.schedule


def test_block_length_cap(llm, tokenizer, markers):
    """`max_block_tokens=5` (per request): after BS and 5 content tokens the model must emit BE."""
    prompt = header(tokenizer)
    script = {2: markers.block_start, **{i: 40 for i in range(3, 8)}}  # the model alone would repeat BS
    output = run(llm, [(prompt, {"max_block_tokens": 5}, script, 12)])[0].outputs[0]
    ids = list(output.token_ids)
    assert ids[2] == markers.block_start and ids[8] == markers.block_end, ids


def test_unknown_keys_are_errors(llm, tokenizer):
    from vllm import SamplingParams

    with pytest.raises(Exception, match="unknown per-request memento option"):
        llm.generate(
            [{"prompt_token_ids": header(tokenizer)}],
            SamplingParams(max_tokens=2, extra_args={"memento": {"keep_last_n_block": 1}}),
            use_tqdm=False,
        )


def test_torch_reference_sanity(reference, tokenizer):
    """The reference itself: the mask of a marker-free sequence is causal."""
    ids = header(tokenizer)
    assert torch.allclose(reference.logprobs(ids, BlockMaskingConfig()), reference.logprobs(ids, None))


# Last: a second engine in the same process tears down the shared one's distributed state.
def test_forced_preemption_keeps_evictions(model_dir, tokenizer, markers, reference):
    """A pool too small for the batch forces preemption; re-prefill replays each eviction at its
    trigger (chunked), so the outputs still match the reference exactly."""
    small = make_llm(model_dir, num_gpu_blocks_override=9, max_model_len=256, max_num_seqs=4)
    try:
        sched = scheduler_of(small)
        prompt = header(tokenizer)
        script = block_script(markers, THREE_BLOCKS[:2])
        outs = run(small, [(prompt, {}, script, 100)] * 4)
        preempts = [e for e in sched.memento_log if e["event"] == "preempt"]
        assert preempts, "the small pool did not force a preemption"
        for request_output in outs:
            check_against_reference(reference, markers, prompt, request_output.outputs[0], {}, script)
        assert (
            sched.kv_cache_manager.block_pool.get_num_free_blocks() == 9 - 1
        )  # all back, except the null block
    finally:
        del small
