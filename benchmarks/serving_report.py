"""Tables and the Fig.-8 plot of a `serving_bench.py --out` file, so the docs show what the run
measured (every batch and the spread), never numbers typed by hand.

    .venv/bin/python benchmarks/serving_report.py benchmarks/results/fig8.json --plot docs/img/fig8.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serving_bench import BASELINE

NAMES = {
    "engine-full": "engine, full",
    "engine-memento": "engine, MEMENTO",
    "vllm-vanilla": "vLLM",
    "vllm-memento": "vLLM + plugin",
}
RATIO_NAMES = {
    "engine-memento": "engine: MEMENTO / full",
    "vllm-memento": "vLLM: plugin / vanilla",
    "engine-full/vllm-vanilla": "full: engine / vLLM",
    "engine-memento/vllm-memento": "MEMENTO: engine / vLLM+plugin",
}


def _range(s: dict[str, Any], fmt: str = ".0f") -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}–{s['max']:{fmt}}]"


def _wait(e: dict[str, Any]) -> str:
    """Median [min–max] share of the wall time spent runnable but waiting for a CPU (other jobs)."""
    q = e.get("runqueue_share")
    return f"{q['median']:.0%} [{q['min']:.0%}–{q['max']:.0%}]" if q else "–"


def _ratio(s: dict[str, Any]) -> str:
    return (
        f"**{s['median']:.2f}×** [{s['min']:.2f}–{s['max']:.2f}] ({', '.join(f'{v:.2f}' for v in s['all'])})"
    )


def _lead(result: dict[str, Any], line: dict[str, Any]) -> str:
    """The row's point: concurrency, plus the variant when the run has several."""
    many = len({t["variant"] for t in result["table"]}) > 1
    return f"| {line['variant']} | {line['concurrency']} |" if many else f"| {line['concurrency']} |"


def _head(result: dict[str, Any], columns: str, rule: str) -> list[str]:
    many = len({t["variant"] for t in result["table"]}) > 1
    return [
        ("| variant | conc. |" if many else "| conc. |") + columns,
        ("|---|---:|" if many else "|---:|") + rule,
    ]


def systems_table(result: dict[str, Any], systems: tuple[str, ...]) -> str:
    """One row per (point, system): medians with min-max over every timed batch."""
    lines = _head(
        result,
        " system | tok/s (wall) | tok/CPU-s | completion s | waiting for a CPU | mean batch | preempt. | peak KV |",
        "---|---|---|---|---|---:|---:|---:|",
    )
    for line in result["table"]:
        for system in systems:
            e = line["systems"].get(system)
            if e:
                lines.append(
                    f"{_lead(result, line)} {NAMES[system]} | {_range(e['tokens_per_s'])} "
                    f"| {_range(e['tokens_per_cpu_s'])} | {_range(e['seconds'], '.1f')} | {_wait(e)} "
                    f"| {e['mean_batch']:.2f} "
                    f"| {e['preemptions']:g} | {e['peak_kv_tokens']:g} |"
                )
    return "\n".join(lines)


def ratios_table(result: dict[str, Any], names: tuple[str, ...]) -> str:
    """Paired ratios, per CPU-second and wall: median [min–max] (every pair); and the ratio of the
    mean running batches, which does not depend on the machine's load."""
    lines = _head(result, " ratio | per CPU-s | wall | mean batch |", "---|---|---|---:|")
    for line in result["table"]:
        for name in names:
            r = line["ratios"].get(name)
            if r:
                a, b = name.split("/") if "/" in name else (name, BASELINE[name])
                batch = line["systems"][a]["mean_batch"] / line["systems"][b]["mean_batch"]
                lines.append(
                    f"{_lead(result, line)} {RATIO_NAMES[name]} | {_ratio(r['cpu_throughput'])} "
                    f"| {_ratio(r['throughput'])} | {batch:.2f}× |"
                )
    return "\n".join(lines)


def hooks_table(result: dict[str, Any]) -> str:
    """memento's own code per step (hook timers) beside the whole step."""
    lines = ["| variant | system | whole step (ms) | memento's own code (µs/step) |", "|---|---|---:|---|"]
    for row in result.get("hook_times", []):
        own = {k: v for k, v in row["hook_us_per_step"].items() if not k.startswith("(")}
        parts = ", ".join(f"{k} {v:.1f}" for k, v in own.items())
        lines.append(f"| {row['variant']} | {NAMES[row['system']]} | {row['ms_per_step']:.2f} | {parts} |")
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    w, a = result["workload"], result["args"]
    return (
        f"`{result['command']}`: {w['requests']} requests, {w['output_tokens']} output tokens "
        f"({w['output_tokens_min_max'][0]}–{w['output_tokens_min_max'][1]} per request, "
        f"{w['blocks_mean']} blocks on average), KV pool {a['pool_tokens']} tokens, {a['reps']} repetitions × "
        f"{a['inner']} batches; {result['wall_seconds'] / 60:.1f} min; load average "
        f"{result['load_average_start'][0]} at the start, {result['load_average_end'][0]} at the end "
        f"(each batch's: {min(r['load_before'] for r in result['runs'])}–"
        f"{max(r['load_before'] for r in result['runs'])}), {result['cpu_cores']} cores"
    )


STYLE = {
    "engine-full": ("engine, full attention", "tab:gray", "o--"),
    "engine-memento": ("engine, MEMENTO", "tab:blue", "o-"),
    "vllm-vanilla": ("vLLM (vanilla)", "tab:red", "s--"),
    "vllm-memento": ("vLLM + memento plugin", "tab:green", "s-"),
}


def plot(result: dict[str, Any], path: Path) -> None:
    """Fig. 8's panels (throughput, completion time vs concurrency) plus throughput per CPU-second,
    which a loaded machine disturbs less: median, bars min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [t for t in result["table"] if t["variant"] == "fig8"]
    panels = {
        "tokens_per_s": "output tokens / s (wall)",
        "tokens_per_cpu_s": "output tokens / CPU-s of the process",
        "seconds": "batch completion time (s)",
    }
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for system, (label, color, style) in STYLE.items():
        points = [(t["concurrency"], t["systems"][system]) for t in table if system in t["systems"]]
        if not points:
            continue
        xs = [c for c, _ in points]
        for ax, key in zip(axes, panels, strict=True):
            med = [e[key]["median"] for _, e in points]
            low = [m - e[key]["min"] for m, (_, e) in zip(med, points, strict=True)]
            high = [e[key]["max"] - m for m, (_, e) in zip(med, points, strict=True)]
            ax.errorbar(xs, med, yerr=[low, high], fmt=style, color=color, label=label, capsize=3)
    for ax, label in zip(axes, panels.values(), strict=True):
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([t["concurrency"] for t in table], [str(t["concurrency"]) for t in table])
        ax.set_xlabel("concurrency (max running requests)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    w, a = result["workload"], result["args"]
    fig.suptitle(
        f"{w['requests']} requests, {w['output_tokens']} output tokens, KV pool {a['pool_tokens']} tokens; "
        f"median of {a['reps']} repetitions x {a['inner']} batches (fresh processes), bars min-max; "
        f"load average {result['load_average_start'][0]}-{result['load_average_end'][0]} "
        f"on {result['cpu_cores']} cores",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, help="a serving_bench.py --out file")
    ap.add_argument("--plot", type=Path, help="write the Fig.-8 plot here (PNG)")
    args = ap.parse_args()
    result = json.loads(args.result.read_text())
    print(header(result), end="\n\n")
    for family in ("engine", "vllm"):
        systems = tuple(n for n in NAMES if n.startswith(family))
        if not any(sys in line["systems"] for line in result["table"] for sys in systems):
            continue
        print(systems_table(result, systems), end="\n\n")
        print(ratios_table(result, (systems[1],)), end="\n\n")
    across = ("engine-full/vllm-vanilla", "engine-memento/vllm-memento")
    if any(name in line["ratios"] for line in result["table"] for name in across):
        print(ratios_table(result, across), end="\n\n")
    if result.get("hook_times"):
        print(hooks_table(result), end="\n\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
