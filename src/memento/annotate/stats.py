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


# The paper's Figure 3 (OpenMementos, 228K traces; medians) and §3 pass rates, shown beside ours.
PAPER_FIG3 = {
    "math": {
        "blocks_per_trace": 9,
        "block_chars": "3.8K",
        "memento_chars": "509-603",
        "compression_chars": 0.16,
    },
    "code": {
        "blocks_per_trace": 9,
        "block_chars": "2.3K-3.8K",
        "memento_chars": "509-603",
        "compression_chars": 0.18,
    },
    "science": {
        "blocks_per_trace": 7,
        "block_chars": "2.3K",
        "memento_chars": "509-603",
        "compression_chars": 0.23,
    },
}
PAPER_PASS_RATES = {"first_pass": 0.28, "after_refinement": 0.92}


def _chars(record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Characters of each block's reasoning and of its memento (the paper's Figure 3 unit)."""
    sentences = record["sentences"]
    blocks = ["".join(sentences[a : b + 1]).strip() for a, b in record["blocks"]]
    return [len(b) for b in blocks], [len(m or "") for m in record["mementos"]]


def _first_scores(record: dict[str, Any]) -> list[float]:
    """Judge scores of the compressor's own mementos, before any refinement."""
    out = []
    for d in record.get("memento_details") or []:
        its = (d or {}).get("iterations") or []
        if its and its[0].get("score") is not None:
            out.append(float(its[0]["score"]))
    return out


def _rate(scores: list[float], threshold: float) -> float | None:
    return round(sum(1 for s in scores if s >= threshold) / len(scores), 4) if scores else None


def domain_stats(records: list[dict[str, Any]], threshold: float = 8.0) -> dict[str, Any]:
    """Figure 3 quantities for one group of traces, in characters and in tokens (medians and more)."""
    block_chars, memento_chars, ratio_chars = [], [], []
    for r in records:
        bc, mc = _chars(r)
        block_chars += bc
        memento_chars += mc
        ratio_chars += [m / b for b, m in zip(bc, mc, strict=True) if b]
    final = [s for r in records for s in r.get("judge_scores") or [] if s is not None]
    first = [s for r in records for s in _first_scores(r)]
    return {
        "traces": len(records),
        "blocks_per_trace": _summary([float(len(r["blocks"])) for r in records]),
        "block_chars": _summary([float(x) for x in block_chars]),
        "memento_chars": _summary([float(x) for x in memento_chars]),
        "compression_chars": _summary(ratio_chars),
        "block_tokens": _summary([float(t) for r in records for t in r["block_tokens"]]),
        "memento_tokens": _summary([float(t) for r in records for t in r["memento_tokens"]]),
        "compression_ratio": _summary([c for r in records for c in r["compression"] if c is not None]),
        "judge_first_pass_rate": _rate(first, threshold),
        "judge_pass_rate": _rate(final, threshold),
    }


def _domain(record: dict[str, Any]) -> str:
    domain = (record.get("extra") or {}).get("domain")
    return str(domain).lower() if domain else "unknown"


def compute_stats(
    records: list[dict[str, Any]], report: SourceReport | None = None, threshold: float = 8.0
) -> dict[str, Any]:
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
        "judge_threshold": threshold,
        "judge_first_pass_rate": _rate([s for r in records for s in _first_scores(r)], threshold),
        "judge_pass_rate": _rate(judge, threshold),
        "scoring_window_failures": scoring_failures,
        "boundaries_filled_from_heuristic": filled,
        "single_block_fallbacks": seg_warnings,
        "tokenizer": records[0]["backend"].get("tokenizer") if records else None,
    }
    domains = sorted({_domain(r) for r in records})
    out["by_domain"] = {"all": domain_stats(records, threshold)}
    if domains != ["unknown"]:
        for d in domains:
            out["by_domain"][d] = domain_stats([r for r in records if _domain(r) == d], threshold)
    if report is not None:
        out["input"] = report.to_dict()
    return out


def _median(summary: dict[str, Any], digits: int = 0) -> str:
    m = summary["median"]
    return "—" if m is None else (f"{m:.{digits}f}" if digits else f"{m:,.0f}")


def _figure3_md(stats: dict[str, Any]) -> list[str]:
    """Medians per domain beside the paper's Figure 3 (characters; tokens of our counter)."""
    lines = [
        "## Per domain (medians), beside the paper's Figure 3",
        "",
        "| domain | traces | blocks / trace | block chars | memento chars | compression (chars) | "
        "block tokens | memento tokens | compression (tokens) | judge pass, first / final |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in stats["by_domain"].items():
        rates = "—"
        if d["judge_pass_rate"] is not None:
            first = d["judge_first_pass_rate"]
            rates = f"{'—' if first is None else f'{100 * first:.0f}%'} / {100 * d['judge_pass_rate']:.0f}%"
        lines.append(
            f"| {name} | {d['traces']} | {_median(d['blocks_per_trace'])} | {_median(d['block_chars'])} | "
            f"{_median(d['memento_chars'])} | {_median(d['compression_chars'], 3)} | {_median(d['block_tokens'])} | "
            f"{_median(d['memento_tokens'])} | {_median(d['compression_ratio'], 3)} | {rates} |"
        )
    for name, p in PAPER_FIG3.items():
        lines.append(
            f"| *paper: {name}* | | {p['blocks_per_trace']} | {p['block_chars']} | {p['memento_chars']} | "
            f"{p['compression_chars']} | | | | "
            f"{100 * PAPER_PASS_RATES['first_pass']:.0f}% / {100 * PAPER_PASS_RATES['after_refinement']:.0f}% |"
        )
    lines += [
        "",
        "Paper: OpenMementos (228K traces, GPT-5.x as scorer, compressor and judge); judge pass = score >= 8/10, "
        "first = the compressor's own memento, final = after refinement (all domains).",
        "",
    ]
    return lines


def _pass_line(stats: dict[str, Any]) -> str:
    if stats["judge_pass_rate"] is None:
        return "Judge pass rate: n/a (no judge: the offline backend writes extractive mementos)."
    return (
        f"Judge pass rate (>= {stats['judge_threshold']:g}/10): first pass {stats['judge_first_pass_rate']}, "
        f"after refinement {stats['judge_pass_rate']} (paper: 0.28 and 0.92)."
    )


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
        _pass_line(stats),
        f"Scoring windows failed: {stats['scoring_window_failures']}; boundaries scored by the heuristic "
        f"instead: {stats['boundaries_filled_from_heuristic']}; traces left as one block: "
        f"{stats['single_block_fallbacks']}.",
    ]
    lines += [""] + _figure3_md(stats)
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
    threshold = ((run_info or {}).get("config") or {}).get("mementos", {}).get("score_threshold", 8.0)
    stats = compute_stats(records, report, threshold)
    if run_info:
        stats["run"] = {k: v for k, v in run_info.items() if k != "config"}
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    (output_dir / "stats.md").write_text(_md(stats), encoding="utf-8")
    if records:
        plot_compression(records, output_dir / "compression.png")
    return stats
