"""The run report: blocks per trace, block and memento sizes, compression (as the paper's Figure 3),
judge scores, scoring failures and rejected traces — `stats.json`, `stats.md`, `compression.png`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from memento.annotate.sources import SourceReport


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "p10": None, "p90": None, "min": None, "max": None}
    vs = sorted(values)

    def q(p: float) -> float:
        return vs[min(len(vs) - 1, max(0, round(p * (len(vs) - 1))))]

    return {
        "count": len(vs),
        "mean": round(statistics.fmean(vs), 4),
        "median": round(statistics.median(vs), 4),
        "p10": round(q(0.1), 4),
        "p90": round(q(0.9), 4),
        "min": round(vs[0], 4),
        "max": round(vs[-1], 4),
    }


def compute_stats(records: list[dict[str, Any]], report: SourceReport | None = None) -> dict[str, Any]:
    blocks_per_trace = [len(r["blocks"]) for r in records]
    block_tokens = [t for r in records for t in r["block_tokens"]]
    memento_tokens = [t for r in records for t in r["memento_tokens"]]
    ratios = [c for r in records for c in r["compression"] if c is not None]
    judge = [s for r in records for s in r.get("judge_scores") or [] if s is not None]
    sentences = [len(r["sentences"]) for r in records]
    scoring_failures = sum(len(r["scoring"].get("failures", [])) for r in records)
    filled = sum(len(r["scoring"].get("filled_from_heuristic", [])) for r in records)
    seg_warnings = sum(1 for r in records if r["segmentation"].get("warning"))
    total_block = sum(block_tokens)
    out: dict[str, Any] = {
        "traces": len(records),
        "traces_written": sum(1 for r in records if r.get("trace")),
        "sentences_per_trace": _summary([float(x) for x in sentences]),
        "blocks_per_trace": _summary([float(x) for x in blocks_per_trace]),
        "block_tokens": _summary([float(x) for x in block_tokens]),
        "memento_tokens": _summary([float(x) for x in memento_tokens]),
        "compression_ratio": _summary(ratios),
        "overall_compression": round(sum(memento_tokens) / total_block, 4) if total_block else None,
        "judge_scores": _summary(judge),
        "judge_pass_rate": round(sum(1 for s in judge if s >= 8.0) / len(judge), 4) if judge else None,
        "scoring_window_failures": scoring_failures,
        "boundaries_filled_from_heuristic": filled,
        "single_block_fallbacks": seg_warnings,
        "tokenizer": records[0]["backend"].get("tokenizer") if records else None,
    }
    if report is not None:
        out["input"] = report.to_dict()
    return out


def _md(stats: dict[str, Any]) -> str:
    lines = ["# memento annotate — run statistics", ""]
    inp = stats.get("input")
    if inp:
        lines += [f"Input rows: {inp['total']}, accepted: {inp['accepted']}.", ""]
        if inp["rejected"]:
            lines += ["| rejected because | traces |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in inp["rejected"].items()]
            lines.append("")
    lines += [
        f"Traces annotated: {stats['traces']} (written to traces.jsonl: {stats['traces_written']}); "
        f"tokenizer: {stats['tokenizer']}.",
        "",
        "| quantity | mean | median | p10 | p90 | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in (
        "sentences_per_trace",
        "blocks_per_trace",
        "block_tokens",
        "memento_tokens",
        "compression_ratio",
        "judge_scores",
    ):
        s = stats[key]
        if s["count"]:
            lines.append(
                f"| {key} | {s['mean']} | {s['median']} | {s['p10']} | {s['p90']} | {s['min']} | {s['max']} |"
            )
    lines += [
        "",
        f"Overall compression (memento tokens / block tokens): {stats['overall_compression']}.",
        f"Judge pass rate (>= 8/10): {stats['judge_pass_rate']}.",
        f"Scoring windows failed: {stats['scoring_window_failures']}; boundaries scored by the heuristic "
        f"instead: {stats['boundaries_filled_from_heuristic']}; traces left as one block: "
        f"{stats['single_block_fallbacks']}.",
    ]
    run = stats.get("run")
    if run:
        failed = f"{run['failed']} failed (listed in errors.jsonl)" if run["failed"] else "none failed"
        lines.append(f"This run: {run['processed']} processed, {failed}.")
    return "\n".join(lines) + "\n"


def plot_compression(records: list[dict[str, Any]], path: Path) -> None:
    """Three panels: blocks per trace, block vs memento tokens, compression ratio distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [len(r["blocks"]) for r in records]
    bt = [t for r in records for t in r["block_tokens"]]
    mt = [t for r in records for t in r["memento_tokens"]]
    ratios = [c for r in records for c in r["compression"] if c is not None]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist(blocks, bins=min(30, max(1, len(set(blocks)))), color="#4c72b0")
    ax[0].set(title="blocks per trace", xlabel="blocks", ylabel="traces")
    ax[1].scatter(bt, mt, s=6, alpha=0.5, color="#55a868")
    ax[1].set(title="memento vs block size", xlabel="block tokens", ylabel="memento tokens")
    ax[2].hist(ratios, bins=30, color="#c44e52")
    if ratios:
        med = statistics.median(ratios)
        ax[2].axvline(med, color="k", ls="--", lw=1)
        ax[2].text(med, ax[2].get_ylim()[1] * 0.9, f" median {med:.2f}", fontsize=8)
    ax[2].set(title="compression ratio", xlabel="memento / block tokens", ylabel="blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_stats(
    output_dir: Path,
    records: list[dict[str, Any]],
    report: SourceReport | None,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    stats = compute_stats(records, report)
    if run_info:
        stats["run"] = {k: v for k, v in run_info.items() if k != "config"}
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    (output_dir / "stats.md").write_text(_md(stats), encoding="utf-8")
    if records:
        plot_compression(records, output_dir / "compression.png")
    return stats
