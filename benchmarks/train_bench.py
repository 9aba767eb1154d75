"""Training throughput: Stage 1 (causal) vs Stage 2 (block mask), and flex_attention vs dense mask.

CPU part (always): tokens/s of a full training step (collate incl. the Stage-2 mask, forward,
backward, AdamW step) for the toy 4-layer d=128 Qwen3 at 256 and 1,024 tokens, same model, same
batch. Stages alternate step by step so load on a shared machine hits both equally.

GPU part (when CUDA is available): Stage 2 at 4K-16K tokens, the dense `(B,1,L,L)` bool mask
through sdpa vs a flex_attention BlockMask built from the kill times, on a larger Qwen3, in bf16.
`--flex-smoke` runs that code path on CPU, forward only and short (flex has no CPU backward).

    .venv/bin/python benchmarks/train_bench.py                     # CPU table
    .venv/bin/python benchmarks/train_bench.py --json out.json     # + machine-readable results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from memento.format import Block, MementoTrace
from memento.hf import register_attention as register_chunked
from memento.tokens import MarkerIds
from memento.toy import build_tiny_model, build_tokenizer
from memento.train import MementoCollator, tokenize_traces
from memento.train.flex import block_mask_from_kill_times


def long_trace(seed: int, numbers_per_block: int = 24, blocks: int = 400) -> MementoTrace:
    """A counting trace long enough to fill any benchmark length (then truncated)."""
    start = 1 + seed * 7
    out, n = [], start
    for _ in range(blocks):
        chunk = list(range(n, n + numbers_per_block))
        out.append(Block(" ".join(map(str, chunk)), f"reached {chunk[-1]}"))
        n += numbers_per_block
    return MementoTrace(f"Count up from {start}.", tuple(out), f"Done at {n - 1}.")


def fixed_length_samples(tokenizer, length: int, count: int, numbers_per_block: int = 24):
    """`count` samples of exactly `length` tokens with real block structure."""
    traces = [long_trace(i, numbers_per_block) for i in range(count)]
    samples, _ = tokenize_traces(traces, tokenizer, max_length=length, overlong="truncate")
    assert all(len(s) == length for s in samples), "trace too short for the requested length"
    return samples


def cpu_stage_comparison(lengths: list[int], batch: int, steps: int, warmup: int, threads: int) -> list[dict]:
    """Median tokens/s per stage at each length (alternating stages step by step)."""
    torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    markers = MarkerIds.from_tokenizer(tokenizer)
    rows = []
    for length in lengths:
        samples = fixed_length_samples(tokenizer, length, batch)
        stage2 = MementoCollator(tokenizer.pad_token_id, "memento", markers)
        # "memento" = what `memento train --stage memento` runs (causal-chunked sdpa);
        # "memento_plain" = the same dense mask through plain sdpa, for reference.
        collators = {
            "full": MementoCollator(tokenizer.pad_token_id, "full"),
            "memento": stage2,
            "memento_plain": stage2,
        }
        models = {s: build_tiny_model(tokenizer, seed=0).train() for s in collators}
        models["memento"].set_attn_implementation(register_chunked())
        optims = {
            s: torch.optim.AdamW(m.parameters(), lr=8e-5, betas=(0.9, 0.999), weight_decay=0.0)
            for s, m in models.items()
        }
        times: dict[str, list[float]] = {s: [] for s in collators}
        collate_times: dict[str, list[float]] = {s: [] for s in collators}
        for step in range(warmup + steps):
            for stage in collators:
                t0 = time.perf_counter()
                batch_inputs = collators[stage](samples)
                t1 = time.perf_counter()
                loss = models[stage](**batch_inputs).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(models[stage].parameters(), 1.0)
                optims[stage].step()
                optims[stage].zero_grad(set_to_none=True)
                t2 = time.perf_counter()
                if step >= warmup:
                    times[stage].append(t2 - t0)
                    collate_times[stage].append(t1 - t0)
        tokens = batch * length
        tps = {s: tokens / statistics.median(t) for s, t in times.items()}
        rows.append(
            {
                "length": length,
                "batch": batch,
                "stage1_tokens_per_s": round(tps["full"]),
                "stage2_tokens_per_s": round(tps["memento"]),
                "stage2_vs_stage1": round(tps["memento"] / tps["full"], 3),
                "stage2_plain_sdpa_tokens_per_s": round(tps["memento_plain"]),
                "stage2_plain_vs_stage1": round(tps["memento_plain"] / tps["full"], 3),
                "stage2_collate_ms": round(1000 * statistics.median(collate_times["memento"]), 2),
            }
        )
        print(
            f"L={length:5d} batch={batch}: stage1 {tps['full']:8.0f} tok/s | stage2 {tps['memento']:8.0f} tok/s "
            f"| ratio {tps['memento'] / tps['full']:.3f} | plain-sdpa stage2 {tps['memento_plain']:8.0f} tok/s "
            f"(ratio {tps['memento_plain'] / tps['full']:.3f}) | stage-2 collate {rows[-1]['stage2_collate_ms']} ms",
            flush=True,
        )
    return rows


def build_bench_model(tokenizer, layers: int, hidden: int, heads: int, attn: str, device: str, dtype):
    model = build_tiny_model(
        tokenizer,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=max(1, heads // 4),
        intermediate=hidden * 3,
        max_position=32768,
        attn_implementation=attn,
    )
    return model.to(device=device, dtype=dtype).train()


def flex_vs_dense(
    lengths: list[int],
    steps: int,
    warmup: int,
    layers: int,
    hidden: int,
    heads: int,
    device: str,
    backward: bool,
) -> list[dict]:
    """Stage-2 step time, batch 1: dense bool mask via plain sdpa and via causal-chunked sdpa, vs flex."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = build_tokenizer()
    markers = MarkerIds.from_tokenizer(tokenizer)
    rows = []
    for length in lengths:
        samples = fixed_length_samples(tokenizer, length, 1, numbers_per_block=64)
        row: dict = {"length": length, "device": device, "backward": backward}
        losses = {}
        for mode in ("dense", "dense_chunked", "flex"):
            collator = MementoCollator(
                tokenizer.pad_token_id,
                "memento",
                markers,
                mask_format="kill_times" if mode == "flex" else "dense",
            )
            model = build_bench_model(
                tokenizer,
                layers,
                hidden,
                heads,
                "flex_attention" if mode == "flex" else "sdpa",
                device,
                dtype,
            )
            if mode == "dense_chunked":
                model.set_attn_implementation(register_chunked())
            if not backward:
                model.eval()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for step in range(warmup + steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                batch = {k: v.to(device) for k, v in collator(samples).items()}
                if mode == "flex":
                    batch["attention_mask"] = block_mask_from_kill_times(batch.pop("kill_times"))
                with torch.set_grad_enabled(backward):
                    loss = model(**batch).loss
                    if backward:
                        loss.backward()
                        model.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                if step >= warmup:
                    times.append(time.perf_counter() - t0)
                losses[mode] = float(loss)
            row[f"{mode}_ms"] = round(1000 * statistics.median(times), 1)
            row[f"{mode}_tokens_per_s"] = round(length / statistics.median(times))
            if device == "cuda":
                row[f"{mode}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            del model
        row.update({f"loss_{mode}": round(value, 4) for mode, value in losses.items()})
        row["flex_speedup"] = round(row["dense_ms"] / row["flex_ms"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="256,1024", help="CPU stage comparison lengths")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flex-lengths", default="4096,8192,16384")
    parser.add_argument("--flex-model", default="8,1024,16", help="layers,hidden,heads of the GPU model")
    parser.add_argument("--flex-smoke", action="store_true", help="run the flex path on CPU (forward, short)")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args()

    results: dict = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
    }
    if not args.skip_cpu:
        lengths = [int(x) for x in args.lengths.split(",")]
        print(f"== CPU, toy Qwen3 4 layers d=128, {args.threads} threads ==", flush=True)
        results["cpu"] = cpu_stage_comparison(lengths, args.batch, args.steps, args.warmup, args.threads)
    layers, hidden, heads = (int(x) for x in args.flex_model.split(","))
    if torch.cuda.is_available():
        flex_lengths = [int(x) for x in args.flex_lengths.split(",")]
        print(
            f"== GPU {torch.cuda.get_device_name()}: flex vs dense, Qwen3 {layers}x{hidden}, bf16 ==",
            flush=True,
        )
        results["gpu"] = flex_vs_dense(
            flex_lengths, args.steps, args.warmup, layers, hidden, heads, "cuda", True
        )
    elif args.flex_smoke:
        print("== flex smoke on CPU (forward only, 2 layers d=128, 512 tokens) ==", flush=True)
        results["flex_smoke"] = flex_vs_dense([512], 2, 1, 2, 128, 4, "cpu", False)
    else:
        print("(no CUDA: flex vs dense GPU part skipped; --flex-smoke runs its code path on CPU)")
    results["load_avg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
