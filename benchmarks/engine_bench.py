"""Engine benchmarks (not unit tests): decode speed vs HF `generate` and the cost of one eviction.
MEMENTO vs full attention under one KV budget is `serving_bench.py` (Fig. 8, beside vLLM).

    .venv/bin/python benchmarks/engine_bench.py --threads 1 --repeats 5 --out benchmarks/results/engine_bench.json

Decode speed: the engine and HF `generate` run side by side in one process, alternating (which
goes first alternates too), median of `--repeats` runs each; wall and process CPU time are both
recorded (on a shared machine CPU time is the less load-sensitive of the two), with the load
average at the start and the end.

The model is a randomly initialised Qwen3 built from a config (no download): big enough that
compute matters on a CPU, small enough to run in minutes. Numbers depend on the machine and its
load; the script prints what it measured and writes it as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from memento.engine import Engine, SamplingParams
from memento.tokens import MarkerIds
from memento.toy import build_tokenizer


def build_model(tokenizer, layers: int, hidden: int, seed: int = 0) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def words(tokenizer, markers: MarkerIds) -> list[int]:
    special = (
        set(tokenizer.all_special_ids) | set(markers.block_markers) | {markers.im_start, markers.assistant}
    )
    return [i for i in range(len(tokenizer)) if i not in special]


def header(tokenizer, i: int) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"problem {i}: add the numbers"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer.encode(text, add_special_tokens=False)


# --- 1. decode speed vs HF generate ------------------------------------------------------------


def bench_decode(model, tokenizer, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    rng = random.Random(batch)
    vocab = words(tokenizer, MarkerIds.from_tokenizer(tokenizer))
    prompts = [[rng.choice(vocab) for _ in range(prompt_len)] for _ in range(batch)]
    engine = Engine(model, tokenizer, mode="full", max_batch_size=batch)
    engine.stop_ids = set()  # a random model may emit EOS; both sides generate exactly new_tokens
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    ids = torch.tensor(prompts)

    def run_engine(new: int = new_tokens) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        outs = engine.generate(prompts, dataclasses.replace(params, max_new_tokens=new))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert all(len(o.output_ids) == new for o in outs)
        return wall, cpu

    def run_hf(new: int = new_tokens) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert out.shape[1] == prompt_len + new
        return wall, cpu

    run_engine(4), run_hf(4)  # warm-up (kernel set-up for these shapes)
    eng, hf = [], []
    for i in range(repeats):  # side by side, alternating which goes first
        pair = (run_engine, run_hf) if i % 2 == 0 else (run_hf, run_engine)
        first, second = pair[0](), pair[1]()
        eng.append(first if i % 2 == 0 else second)
        hf.append(second if i % 2 == 0 else first)
    tokens = batch * new_tokens
    e, h = statistics.median(w for w, _ in eng), statistics.median(w for w, _ in hf)
    ec, hc = statistics.median(c for _, c in eng), statistics.median(c for _, c in hf)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "engine_tok_s": round(tokens / e, 1),
        "hf_generate_tok_s": round(tokens / h, 1),
        "speedup": round(h / e, 2),
        "speedup_cpu_time": round(hc / ec, 2),
        "engine_wall_s": [round(w, 3) for w, _ in eng],
        "hf_wall_s": [round(w, 3) for w, _ in hf],
        "note": "medians of alternating runs; wall time includes the prefill of the prompts, for both",
    }


# --- 2. cost of one eviction --------------------------------------------------------------------


@torch.inference_mode()
def bench_eviction(model, tokenizer, cached: int, span: int, tail: int, repeats: int) -> dict:
    """Time `remove_slots` on a row holding `cached` tokens (a block of `span` tokens followed by
    `tail` retained tokens, as at a keep-0 `<|summary_end|>`; and the worst case, a block at the
    start of the cache) against one batch-1 decode step at that cache size."""
    engine = Engine(model, tokenizer, mode="full", max_batch_size=1)
    cache, runner = engine.cache, engine.runner
    cache.reset()
    row = cache.add_row()
    cache._ensure_slots(row, cached + 2)
    pages = list(cache.pages[row])
    cache.storage.normal_()
    slots = torch.arange(cached + 2)
    where = cache._slots(row, slots)
    cache.bias[where] = 0.0
    cache.positions[where] = slots

    def refill() -> None:  # every eviction starts from the same full row
        cache.pages[row] = list(pages)
        cache.lengths[row] = cached
        cache.num_pages = len(pages)
        cache._page_row = [row] * len(pages)
        cache._owner = None
        cache.bias[where] = 0.0

    def decode() -> float:
        refill()
        t = time.perf_counter()
        runner.decode([5], [cached])
        return time.perf_counter() - t

    def evict(start: int) -> float:
        refill()
        t = time.perf_counter()
        cache.remove_slots(row, start, start + span)
        return time.perf_counter() - t

    decode(), evict(0)
    step = statistics.median(decode() for _ in range(repeats))
    typical = statistics.median(evict(cached - tail - span) for _ in range(repeats))
    worst = statistics.median(evict(0) for _ in range(repeats))
    return {
        "cached_tokens": cached,
        "span": span,
        "tail_moved": tail,
        "decode_step_ms": round(step * 1e3, 3),
        "evict_keep0_ms": round(typical * 1e3, 3),
        "evict_keep0_vs_step": round(typical / step, 3),
        "evict_worst_ms": round(worst * 1e3, 3),
        "evict_worst_vs_step": round(worst / step, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--only", default="decode,eviction", help="comma-separated parts to run")
    ap.add_argument("--repeats", type=int, default=3, help="decode: alternating runs per side (median)")
    ap.add_argument("--cases", default=None, help="decode cases as batch:prompt:new,... (default: 4 cases)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.layers, args.hidden)
    quick = args.quick
    result: dict = {
        "model": f"Qwen3 {args.layers} layers, d={args.hidden}, random init, fp32",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    parts = set(args.only.split(","))
    if args.out and args.out.exists():  # keep the parts not re-run
        result = {**json.loads(args.out.read_text()), **result}
    cases = [(1, 64, 128), (16, 64, 128), (1, 1024, 256), (16, 1024, 256)]
    if quick:
        cases = [(1, 64, 32), (16, 64, 32)]
    if args.cases:
        cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
    if "decode" in parts:
        result["decode"] = [
            bench_decode(model, tokenizer, b, prompt_len=p, new_tokens=n, repeats=args.repeats)
            for b, p, n in cases
        ]
        print(json.dumps(result["decode"], indent=1), flush=True)
    if "eviction" in parts:
        result["eviction"] = [
            bench_eviction(model, tokenizer, cached, span=500, tail=60, repeats=5 if quick else 20)
            for cached in (2000, 16000)
        ]
        print(json.dumps(result["eviction"], indent=1), flush=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
