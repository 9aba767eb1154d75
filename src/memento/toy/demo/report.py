"""Stage `report`: per-mode numbers from the eval records, the table on the console,
DIR/report.json and DIR/report.md, and the plots (kv_curve.png: the sawtooth; bars.png)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memento.toy.demo.data import read_test
from memento.toy.demo.evaluate import MODE_LABELS, MODES, read_records
from memento.toy.demo.profiles import RUNS, STAGES, DemoConfig
from memento.toy.runner import StageRunner, Ui


def summarize(records: list[dict], tokens_per_s: float, n_examples: int) -> dict[str, Any]:
    """Per-mode numbers for the table and report.json."""
    n = len(records)
    mean = lambda key: sum(r[key] for r in records) / n if n else 0.0  # noqa: E731
    block = sum(r["block_tokens"] for r in records)
    memento = sum(r["memento_tokens"] for r in records)
    return {
        "n": n,
        "accuracy": mean("correct"),
        "well_formed": mean("well_formed"),
        "peak_kv": mean("peak_kv"),
        "auc_kv": mean("auc_kv"),
        "max_peak_kv": max((r["peak_kv"] for r in records), default=0),
        "output_tokens": mean("output_tokens"),
        "tokens_per_s": tokens_per_s,
        "compression": (block / memento) if memento else None,
        "examples": [
            {k: r[k] for k in ("prompt", "output", "answer", "expected", "correct", "peak_kv", "auc_kv")}
            for r in records[:n_examples]
        ],
    }


def stage_report(cfg: DemoConfig, ui: Ui, runner: StageRunner) -> dict:
    """Table on the console, report.json / report.md, and the plots."""
    s = cfg.settings
    eval_info = runner.done("eval") or {}
    records = {m: read_records(cfg, m) for m in MODES}
    modes = {
        m: summarize(records[m], eval_info.get(m, {}).get("tokens_per_s", 0.0), s.n_examples) for m in MODES
    }
    control = modes["control"]
    for m in MODES:
        modes[m]["peak_kv_reduction"] = (
            control["peak_kv"] / modes[m]["peak_kv"] if modes[m]["peak_kv"] else None
        )
        modes[m]["auc_kv_reduction"] = control["auc_kv"] / modes[m]["auc_kv"] if modes[m]["auc_kv"] else None
    timings = {name: (runner.done(name) or {}).get("seconds") for name in STAGES if name != "report"}
    cpu = {name: (runner.done(name) or {}).get("cpu_seconds") for name in STAGES if name != "report"}
    train_info = {name: runner.done(name) for name in RUNS}
    plots = write_plots(cfg.out, records, modes)
    report = {
        "profile": s.name,
        "seed": cfg.seed,
        "settings": asdict(s),
        "task": {
            "name": f"addition chain x <- (x + b) mod {s.task.modulus}, digits least-significant first",
            "example_prompt": s.task.prompt(read_test(cfg.paths.test)[0]),
        },
        "modes": modes,
        "peak_kv_reduction": modes["memento"]["peak_kv_reduction"],
        "note": reading_note(modes),
        "training": train_info,
        "timings_s": timings,
        "total_seconds": round(sum(t for t in timings.values() if t), 1),
        # CPU time is what the run takes on an idle machine; wall time grows with other jobs' load.
        "cpu_timings_s": cpu,
        "total_cpu_seconds": round(sum(t for t in cpu.values() if t), 1),
        "machine": {"cpus": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "plots": plots,
        "models": {"memento": "model-memento", "control": "model-control"},
    }
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2))
    (cfg.out / "report.md").write_text(render_markdown(report))
    print_table(ui, report)
    return {"plots": plots}


# Below this share of exact MEMENTO answers the run shows the format and the KV curve, not accuracy.
SMOKE_BELOW = 0.5


def reading_note(modes: dict) -> str | None:
    """A plain warning when the MEMENTO model got fewer than half the problems right."""
    accuracy = modes["memento"]["accuracy"]
    if accuracy >= SMOKE_BELOW:
        return None
    return (
        f"memento got {accuracy:.1%} exact (< {SMOKE_BELOW:.0%}): read this run as a format and KV smoke run, "
        "not as an accuracy result (train longer: --scale, or the default profile)"
    )


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for m in MODES:
        r = report["modes"][m]
        comp = f"{r['compression']:.1f}×" if r["compression"] else "–"
        red = f"{r['peak_kv_reduction']:.2f}×" if r["peak_kv_reduction"] else "–"
        rows.append(
            [
                MODE_LABELS[m],
                f"{r['accuracy']:.1%}",
                f"{r['well_formed']:.1%}",
                f"{r['peak_kv']:.0f}",
                red,
                f"{r['auc_kv']:,.0f}",
                f"{r['tokens_per_s']:,.0f}",
                comp,
            ]
        )
    return rows


TABLE_HEADER = ["mode", "accuracy", "well-formed", "peak KV", "peak KV vs control", "AUC KV", "tokens/s",
                "compression"]  # fmt: skip


def print_table(ui: Ui, report: dict) -> None:
    if ui.console is None or ui.quiet:
        return
    from rich.table import Table

    n = report["modes"]["control"]["n"]
    table = Table(title=f"memento demo ({report['profile']}): {n} held-out problems, greedy")
    for i, h in enumerate(TABLE_HEADER):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(report):
        table.add_row(*row)
    ui.console.print(table)
    if report.get("note"):
        ui.console.print(f"[yellow]note: {report['note']}[/yellow]")
    ui.console.print(f"plots: {', '.join(report['plots'].values())}")


def render_markdown(report: dict) -> str:
    lines = [
        f"# memento demo report ({report['profile']})",
        "",
        f"Task: {report['task']['name']}. Example prompt: `{report['task']['example_prompt']}`",
        "",
        f"{report['modes']['control']['n']} held-out problems, greedy decoding. Peak/AUC KV in tokens "
        "(cached tokens while generating; AUC = sum over generated tokens). Compression = block tokens / "
        "memento tokens.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    if report.get("note"):
        lines += ["", f"**Note: {report['note']}.**"]
    lines += [
        "",
        "![KV cache while generating one problem](kv_curve.png)",
        "",
        "![accuracy and peak KV](bars.png)",
        "",
    ]
    lines += ["## Training", "", "| run | steps | seconds | tokens/s | final loss |", "|---|---|---|---|---|"]
    for name, info in report["training"].items():
        if info:
            loss = f"{info['final_loss']:.4f}" if info.get("final_loss") is not None else "–"
            lines.append(
                f"| {name} | {info['steps']} | {info['train_seconds']} | {info['tokens_per_s']:,.0f} | {loss} |"
            )
    lines += [
        "",
        f"Stage timings (s): {report['timings_s']}; total {report['total_seconds']} s wall, "
        f"{report['total_cpu_seconds']} s CPU; load average at the end {report['machine']['load_avg_1_5_15']} "
        f"on {report['machine']['cpus']} CPUs.",
        "",
    ]
    lines += ["## Examples", ""]
    for m in MODES:
        for ex in report["modes"][m]["examples"][:1]:
            lines += [f"### {MODE_LABELS[m]} — {'correct' if ex['correct'] else 'wrong'}", "", "```",
                      ex["prompt"] + ex["output"], "```", ""]  # fmt: skip
    return "\n".join(lines)


def write_plots(out: Path, records: dict[str, list[dict]], modes: dict[str, dict]) -> dict[str, str]:
    """kv_curve.png (one problem: control vs memento vs restart, the sawtooth) and bars.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The problem to draw: the longest one both models got right (else the first one).
    pick = 0
    best = -1
    for i, (c, m) in enumerate(zip(records["control"], records["memento"], strict=True)):
        if c["correct"] and m["correct"] and len(m["kv_trace"]) > best:
            pick, best = i, len(m["kv_trace"])
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    styles = {"control": ("#888888", "-"), "memento": ("#d62728", "-"), "restart": ("#1f77b4", ":")}
    for m in MODES:
        trace = records[m][pick]["kv_trace"]
        color, ls = styles[m]
        ax.plot(range(len(trace)), trace, ls, color=color, lw=1.4, label=MODE_LABELS[m])
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (tokens)")
    n = records["control"][pick]["problem"]["n"]
    ax.set_title(f"KV cache while solving one held-out problem (n={n} steps)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "kv_curve.png")
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7, 3), dpi=110)
    names = ["control", "memento", "restart"]
    colors = [styles[m][0] for m in names]
    a1.bar(names, [100 * modes[m]["accuracy"] for m in names], color=colors)
    a1.set_ylabel("exact answers (%)")
    a1.set_ylim(0, 100)
    a2.bar(names, [modes[m]["peak_kv"] for m in names], color=colors)
    a2.set_ylabel("mean peak KV (tokens)")
    for a in (a1, a2):
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bars.png")
    plt.close(fig)
    return {"kv_curve": str(out / "kv_curve.png"), "bars": str(out / "bars.png")}
