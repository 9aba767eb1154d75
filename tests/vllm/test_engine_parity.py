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
from _toy import HFReference  # noqa: E402

from memento.integrations.vllm import CPU_WORKER_CLS, SCHEDULER_CLS  # noqa: E402
from memento.integrations.vllm.logits import FORCE_KEY  # noqa: E402
from memento.masking import BlockMaskingConfig, evictions  # noqa: E402
from memento.tokens import MarkerIds  # noqa: E402

TOL = 1e-4
# (block start, block end, summary end) as output indices; ~40-token blocks free whole KV blocks.
THREE_BLOCKS = [(1, 40, 44), (46, 85, 89), (91, 110, 113)]


@pytest.fixture(scope="module")
def llm(model_dir):
    """One engine for the module (a second `LLM` in one process breaks the first)."""
    from vllm import LLM

    engine = LLM(
        model=str(model_dir),
        dtype="float32",
        block_size=32,
        enable_prefix_caching=False,
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=8,
        seed=0,
        scheduler_cls=SCHEDULER_CLS,
        worker_cls=CPU_WORKER_CLS,
        logits_processors=["memento.integrations.vllm.logits:ForcedTokensProcessor"],
        additional_config={"memento": {"keep_last_n_blocks": 0, "debug": True}},
        kv_cache_memory_bytes=16 << 20,
    )
    yield engine
    del engine


def header(tokenizer, question: str = "Compute 47 + 38 step by step.") -> list[int]:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    return tokenizer.encode(text, add_special_tokens=False)


def block_script(m: MarkerIds, blocks: list[tuple[int, int, int]]) -> dict[int, int]:
    """Force BS at b, BE at e, SS at e+1 and SE at s (output indices)."""
    script: dict[int, int] = {}
    for b, e, s in blocks:
        script.update({b: m.block_start, e: m.block_end, e + 1: m.summary_start, s: m.summary_end})
    return script


def run_vllm(llm, requests: list[tuple[list[int], dict, dict[int, int], int]]):
    """requests: (prompt ids, per-request memento overrides, forced script, max_tokens)."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=n,
            ignore_eos=True,
            logprobs=1,
            extra_args={"memento": o, FORCE_KEY: {str(k): v for k, v in s.items()}},
        )
        for _, o, s, n in requests
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p, *_ in requests], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


class ForceAndRecord:
    """Our engine's logits hook: record the logits each token was sampled from, then force the
    scripted token (everything else -inf), like vLLM's `ForcedTokensProcessor`."""

    def __init__(self, scripts: list[dict[int, int]]) -> None:
        self.scripts = scripts
        self.logits: dict[int, dict[int, torch.Tensor]] = {}

    def __call__(self, seq, logits: torch.Tensor) -> torch.Tensor:
        index = len(seq.output_ids)
        self.logits.setdefault(seq.prompt_index, {})[index] = logits.detach().float().clone()
        token = self.scripts[seq.prompt_index].get(index)
        if token is None:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced


def run_ours(model_dir, mode: str, masking: BlockMaskingConfig, requests):
    """The same requests through `memento.engine.Engine` (greedy, EOS ignored like vLLM's
    `ignore_eos`); returns (outputs, per-request {output index: logits})."""
    from memento.engine import Engine, SamplingParams

    hook = ForceAndRecord([s for _, _, s, _ in requests])
    engine = Engine.from_pretrained(model_dir, mode=mode, masking=masking, logits_hook=hook)
    engine.stop_ids = set()
    outs = engine.generate(
        [p for p, *_ in requests], [SamplingParams(temperature=0, max_new_tokens=n) for *_, n in requests]
    )
    return outs, [hook.logits[i] for i in range(len(requests))]


def assert_same(vllm_out, ours, our_logits, script, name):
    """Identical ids; log-prob of each sampled (non-forced) token within TOL."""
    got = list(vllm_out.token_ids)
    assert got == list(ours.output_ids), f"{name}: vLLM {got} vs engine {list(ours.output_ids)}"
    for i, token in enumerate(got):
        if i in script:
            continue
        ref = torch.log_softmax(our_logits[i], dim=-1)[token].item()
        lp = vllm_out.logprobs[i][token].logprob
        assert abs(lp - ref) <= TOL, (name, i, lp, ref)


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
