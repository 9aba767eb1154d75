"""vLLM with the memento plugin vs vanilla vLLM: same model, same KV pool, rising concurrency.

Every request generates the same block-structured stream (markers forced by
`ForcedTokensProcessor`, so a random tiny model produces MEMENTO-shaped output of a fixed length);
the only difference between the two engines is whether completed blocks are evicted. Reports
completion time, output tokens/s, peak KV blocks in use and preemptions. Run in the vLLM venv:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_bench.py --out docs/vllm_bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: we read the block pool
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm"))


def block_script(m, n_blocks: int, block_len: int, summary_len: int, start: int = 1) -> dict[str, int]:
    script, pos = {}, start
    for _ in range(n_blocks):
        script[str(pos)] = m.block_start
        script[str(pos + block_len + 1)] = m.block_end
        script[str(pos + block_len + 2)] = m.summary_start
        script[str(pos + block_len + 3 + summary_len)] = m.summary_end
        pos += block_len + summary_len + 6
    return script, pos


def run_engine(model_dir: Path, memento: bool, concurrency: list[int], args) -> list[dict]:
    from transformers import AutoTokenizer

    from memento.integrations.vllm.logits import FORCE_KEY
    from memento.integrations.vllm.plugin import engine_kwargs
    from memento.tokens import MarkerIds
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=str(model_dir),
        dtype="float32",
        block_size=32,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        num_gpu_blocks_override=args.kv_blocks,
        kv_cache_memory_bytes=64 << 20,
        max_num_seqs=max(concurrency),
        seed=0,
        logits_processors=["memento.integrations.vllm.logits:ForcedTokensProcessor"],
        enable_prefix_caching=False,
    )
    if memento:
        extra = engine_kwargs({"keep_last_n_blocks": 0})
        kwargs.update({k: v for k, v in extra.items() if k != "logits_processors"})
    llm = LLM(**kwargs)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    total = pool.get_num_free_blocks()
    tok = AutoTokenizer.from_pretrained(model_dir)
    m = MarkerIds.from_tokenizer(tok)
    prompt = tok.encode(
        "<|im_start|>user\nCompute 47 + 38 step by step.<|im_end|>\n<|im_start|>assistant\n<think>\n",
        add_special_tokens=False,
    )
    script, length = block_script(m, args.blocks, args.block_len, args.summary_len)
    params = SamplingParams(
        temperature=0.0, max_tokens=length + 8, ignore_eos=True, extra_args={FORCE_KEY: script}
    )
    peak = [0]
    preempt = [0]
    original_schedule, original_preempt = sched.schedule, sched._preempt_request

    def schedule(*a, **k):
        out = original_schedule(*a, **k)
        peak[0] = max(peak[0], total - pool.get_num_free_blocks())
        return out

    def preempt_hook(*a, **k):
        preempt[0] += 1
        return original_preempt(*a, **k)

    sched.schedule, sched._preempt_request = schedule, preempt_hook
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    rows = []
    for c in concurrency:
        peak[0] = preempt[0] = 0
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": prompt}] * c, [params] * c, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append(
            {
                "engine": "memento" if memento else "vanilla",
                "concurrency": c,
                "seconds": round(dt, 2),
                "output_tokens": n_out,
                "tokens_per_s": round(n_out / dt, 1),
                "peak_kv_blocks": peak[0],
                "pool_blocks": total,
                "preemptions": preempt[0],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    del llm
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--kv-blocks", type=int, default=48, help="KV pool size in 32-token blocks (both engines)"
    )
    parser.add_argument("--blocks", type=int, default=5, help="reasoning blocks per request")
    parser.add_argument("--block-len", type=int, default=48)
    parser.add_argument("--summary-len", type=int, default=6)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    from _toy import make_sharp_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_sharp_checkpoint(Path(tmp) / "toy")
        rows = run_engine(model_dir, False, concurrency, args) + run_engine(
            model_dir, True, concurrency, args
        )
    by = {(r["engine"], r["concurrency"]): r for r in rows}
    for c in concurrency:
        v, m = by[("vanilla", c)], by[("memento", c)]
        print(
            f"concurrency {c:3d}: vanilla {v['tokens_per_s']:7.1f} tok/s ({v['seconds']:.1f} s, peak {v['peak_kv_blocks']} blocks, "
            f"{v['preemptions']} preemptions) | memento {m['tokens_per_s']:7.1f} tok/s ({m['seconds']:.1f} s, peak "
            f"{m['peak_kv_blocks']} blocks, {m['preemptions']} preemptions) | speed-up {m['tokens_per_s'] / v['tokens_per_s']:.2f}x"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
