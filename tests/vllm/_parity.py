"""Shared by the vLLM parity tests: forced block scripts, running a batch through vLLM + the plugin
and through our own engine, and comparing the two token by token."""

from __future__ import annotations

import torch

from memento.integrations.vllm import CPU_WORKER_CLS, SCHEDULER_CLS
from memento.integrations.vllm.logits import FORCE_KEY
from memento.masking import BlockMaskingConfig
from memento.tokens import MarkerIds

TOL = 1e-4
# (block start, block end, summary end) as output indices; ~40-token blocks free whole KV blocks.
THREE_BLOCKS = [(1, 40, 44), (46, 85, 89), (91, 110, 113)]


def make_llm(model_dir, **memento):
    """vLLM with the plugin on one tiny model: fp32, eager, 32-token KV blocks, a 16 MiB KV pool,
    debug log on, scripted tokens forced by `ForcedTokensProcessor`."""
    from vllm import LLM

    return LLM(
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
        logits_processors=[
            "memento.integrations.vllm.logits:ForcedTokensProcessor",
            "memento.integrations.vllm.logits:BlockLengthCapProcessor",
        ],
        additional_config={"memento": {"keep_last_n_blocks": 0, "debug": True, **memento}},
        kv_cache_memory_bytes=16 << 20,
    )


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
