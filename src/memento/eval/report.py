"""From per-sample results to `summary.json`, a side-by-side `report.md` and PNG plots.

The table mirrors the paper's Table 1: one column per run (mode or responses file), rows for
accuracy and memory, and a Δ against the first column — additive (points) for accuracy,
multiplicative (×) for KV sizes, because that is how the trade-off is read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from memento.eval.grading import cluster_answers
from memento.eval.metrics import compare_runs, coverage, ks_for, mean_maj_at_k, mean_pass_at_k, pass1
from memento.kv import KVShape, expand_steps, expand_trace


def _mean(values: Sequence[float | int | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_order(records: Sequence[dict], preferred: Sequence[str] = ()) -> list[str]:
    """Runs in the order asked for, then any others in order of first appearance."""
    seen = [m for m in preferred if any(r["mode"] == m for r in records)]
    for r in records:
        if r["mode"] not in seen:
            seen.append(r["mode"])
    return seen


def _by_problem(records: Sequence[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.get("problem_index", 0), r["sample"])):
        grouped[str(r["id"])].append(r)
    return dict(grouped)


def sample_kv_bytes(record: dict, shape: KVShape) -> tuple[int, int] | None:
    """(peak, AUC) KV bytes of one sample over all the model's layers, each by its type: a
    full-attention layer holds the sample's KV trace, a sliding-window layer the trace recorded for
    its window (`kv_runs_window`). None when the record lacks a trace it needs."""
    if record.get("peak_kv") is None:
        return None
    if not shape.sliding:  # every layer holds every cached token: exact from the token counts
        return record["peak_kv"] * shape.bytes_per_token, (record.get("auc_kv") or 0) * shape.bytes_per_token
    by_window = record.get("kv_runs_window") or {}
    windows = [w for w in shape.layer_counts() if w is not None]
    if record.get("kv_runs") is None or any(str(w) not in by_window for w in windows):
        return None
    traces: dict[int | None, list[int]] = {None: expand_trace(record["kv_runs"])}
    traces.update({w: expand_steps(by_window[str(w)]) for w in windows})
    if not traces[None]:
        return None
    held = shape.bytes_trace(traces)
    return max(held), sum(held)


def kv_bytes_summary(records: Sequence[dict], shape: KVShape) -> dict:
    """Peak KV in GB and AUC in GB·ktok (the paper's Table-1 units), means over samples, counted
    by layer type; samples without window traces count every layer as full attention (said so)."""
    peaks, aucs, fallback = [], [], 0
    for r in records:
        got = sample_kv_bytes(r, shape)
        if got is None and r.get("peak_kv") is not None:  # a sliding model without window traces
            fallback += 1
            got = r["peak_kv"] * shape.bytes_per_token, (r.get("auc_kv") or 0) * shape.bytes_per_token
        if got is not None:
            peaks.append(got[0])
            aucs.append(got[1])
    if not peaks:
        return {}
    return {
        "peak_kv_gb": sum(peaks) / len(peaks) / 1e9,
        "auc_kv_gb_ktok": sum(aucs) / len(aucs) / 1e12,
        "kv_shape": shape.name,
        "kv_gb_basis": "by layer type" if shape.sliding and not fallback else "every layer full attention",
        "kv_gb_full_fallback": fallback,
    }


def summarize_run(
    records: Sequence[dict],
    kind: str,
    bytes_per_token: int | None = None,
    seed: int = 0,
    shape: KVShape | None = None,
) -> dict:
    """Aggregate one run's per-sample records (all of the same mode). KV bytes come from `shape`
    (by layer type) or, without one, `bytes_per_token` (every layer full attention)."""
    grouped = _by_problem(records)
    correct = {pid: [bool(r["correct"]) for r in rs] for pid, rs in grouped.items()}
    classes = {pid: cluster_answers([r.get("extracted") for r in rs], kind) for pid, rs in grouped.items()}
    n_min = min(len(c) for c in correct.values())
    acc, se = pass1(correct)
    ks = ks_for(n_min)
    peak = _mean([r.get("peak_kv") for r in records])
    compressions = [r.get("compression") for r in records]
    total_block = sum(r.get("block_tokens") or 0 for r in records)
    total_memento = sum(r.get("memento_tokens") or 0 for r in records)
    summary = {
        "problems": len(grouped),
        "samples": len(records),
        "n_min": n_min,
        "n_max": max(len(c) for c in correct.values()),
        "pass@1": acc,
        "pass@1_se": se,
        "pass@k": {str(k): mean_pass_at_k(correct, k) for k in ks},
        "maj@k": {str(k): mean_maj_at_k(classes, correct, k, seed=seed) for k in ks},
        "coverage": coverage(correct),
        "answered": sum(r.get("extracted") is not None for r in records) / len(records),
        "truncated": sum(r.get("finish_reason") == "length" for r in records) / len(records),
        "peak_kv": peak,
        "peak_kv_max": max((r["peak_kv"] for r in records if r.get("peak_kv") is not None), default=None),
        "auc_kv": _mean([r.get("auc_kv") for r in records]),
        "output_tokens": _mean([r.get("output_tokens") for r in records]),
        "blocks": _mean([r.get("blocks") for r in records]),
        "block_tokens": _mean([r.get("block_tokens") for r in records]),
        "memento_tokens": _mean([r.get("memento_tokens") for r in records]),
        "compression": _mean(compressions),
        "compression_pooled": total_memento / total_block if total_block else None,
        "size_basis": next((r.get("size_basis") for r in records if r.get("size_basis")), "tokens"),
    }
    if peak is not None and shape is not None:
        summary.update(kv_bytes_summary(records, shape))
    elif peak is not None and bytes_per_token:
        summary["peak_kv_gb"] = peak * bytes_per_token / 1e9
        summary["auc_kv_gb_ktok"] = (summary["auc_kv"] or 0) * bytes_per_token / 1e12
    return summary


def summarize(
    records: Sequence[dict],
    *,
    benchmark: str,
    kind: str,
    problems: int,
    order: Sequence[str] = (),
    bytes_per_token: int | None = None,
    seed: int = 0,
    shape: KVShape | None = None,
) -> dict:
    """Everything `summary.json` holds: per-run aggregates and first-vs-other overlaps."""
    runs = run_order(records, order)
    per_run = {
        m: summarize_run([r for r in records if r["mode"] == m], kind, bytes_per_token, seed, shape)
        for m in runs
    }
    if shape is not None:
        bytes_per_token = shape.bytes_per_token
    correct_by_run = {
        m: {
            pid: [bool(r["correct"]) for r in rs]
            for pid, rs in _by_problem([r for r in records if r["mode"] == m]).items()
        }
        for m in runs
    }
    comparisons = [
        {"a": runs[0], "b": m, **compare_runs(correct_by_run[runs[0]], correct_by_run[m])} for m in runs[1:]
    ]
    return {
        "benchmark": benchmark,
        "kind": kind,
        "problems": problems,
        "kv_bytes_per_token": bytes_per_token,
        "kv_shape": shape.describe() if shape is not None else None,
        "order": runs,
        "runs": per_run,
        "comparisons": comparisons,
    }


# --- markdown -----------------------------------------------------------------------------------


def _fmt_num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}K"
    return f"{v:,.{digits}f}"


def _delta_add(v, base) -> str:
    return "" if v is None or base is None else f" ({100 * (v - base):+.1f})"


def _delta_mul(v, base) -> str:
    return "" if v is None or not base else f" (×{v / base:.2f})"


def _kv_note(summary: dict) -> list[str]:
    """Which model shape the GB rows are for, and whether they count layers by type."""
    shape = summary.get("kv_shape")
    if not shape:
        return []
    runs = summary["runs"].values()
    fallback = sum(r.get("kv_gb_full_fallback", 0) for r in runs)
    basis = "counted by layer type" if "sliding" in shape else "every layer full attention"
    note = f"KV bytes: {shape}; {basis}."
    if fallback and "sliding" in shape:
        note += f" {fallback} sample(s) had no sliding-window traces and count every layer as full."
    return [note, ""]


def render_markdown(summary: dict, plots: Sequence[str] = (), per_problem: dict | None = None) -> str:
    runs = summary["order"]
    first = runs[0]
    R = summary["runs"]
    n = min(R[m]["n_min"] for m in runs)
    kmax = str(max(ks_for(n)))
    basis = R[first].get("size_basis", "tokens")
    rows: list[tuple[str, str, bool]] = [  # (label, key, additive)
        ("Accuracy pass@1 (%)", "pass@1", True),
        (f"maj@{kmax} (%)", f"maj@k:{kmax}", True),
        (f"pass@{kmax} (%)", f"pass@k:{kmax}", True),
        ("Answered (%)", "answered", True),
        ("Truncated (%)", "truncated", True),
        ("Peak KV (tokens)", "peak_kv", False),
        ("Peak KV (GB)", "peak_kv_gb", False),
        ("AUC KV (token·steps)", "auc_kv", False),
        ("AUC KV (GB·ktok)", "auc_kv_gb_ktok", False),
        ("Output tokens", "output_tokens", False),
        ("Blocks / sample", "blocks", False),
        (f"Block {basis} / sample", "block_tokens", False),
        (f"Memento {basis} / sample", "memento_tokens", False),
        ("Compression (memento / block)", "compression", False),
    ]

    def get(m: str, key: str):
        if ":" in key:
            name, k = key.split(":")
            return R[m][name].get(k)
        return R[m].get(key)

    graded = sorted({R[m]["problems"] for m in runs})
    if graded == [summary["problems"]]:
        counted = f"{summary['problems']} problems"
    else:  # say how many were graded, not how many the benchmark has
        span = str(graded[0]) if len(graded) == 1 else f"{graded[0]}–{graded[-1]}"
        counted = f"{span} of {summary['problems']} problems graded"
    lines = [
        f"# {summary['benchmark']} — {counted}, {n} sample(s) each",
        "",
        "Δ vs the first column: additive in points for rates, multiplicative for sizes.",
        "",
        *_kv_note(summary),
        "| | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    if any(R[m]["problems"] != summary["problems"] for m in runs):  # a partial run: say so
        lines.append("| Problems graded | " + " | ".join(str(R[m]["problems"]) for m in runs) + " |")
    for label, key, additive in rows:
        values = [get(m, key) for m in runs]
        if all(v is None for v in values):
            continue
        cells = []
        for m, v in zip(runs, values, strict=True):
            base = get(first, key)
            if additive:
                text = "—" if v is None else f"{100 * v:.1f}"
                if key == "pass@1" and v is not None:
                    text += f" ± {100 * R[m]['pass@1_se']:.1f}"
                if m != first:
                    text += _delta_add(v, base)
            else:
                digits = 3 if key in ("compression", "peak_kv_gb", "auc_kv_gb_ktok") else 1
                text = _fmt_num(v, digits)
                if m != first and key != "compression":
                    text += _delta_mul(v, base)
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if summary["comparisons"]:
        lines += [
            "",
            "## Solved sets (a problem is solved when any sample is correct)",
            "",
            "| a | b | coverage a | coverage b | union | both | only a | only b | Jaccard |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in summary["comparisons"]:
            lines.append(
                f"| {c['a']} | {c['b']} | {100 * c['coverage_a']:.1f} | {100 * c['coverage_b']:.1f} | "
                f"{100 * c['coverage_union']:.1f} | {c['both']} | {c['only_a']} | {c['only_b']} | {c['jaccard']:.3f} |"
            )

    ks = sorted({k for m in runs for k in R[m]["maj@k"]}, key=int)
    if len(ks) > 1:
        lines += ["", "## pass@k / maj@k (%)", "", "| run | " + " | ".join(f"k={k}" for k in ks) + " |"]
        lines.append("|---|" + "---|" * len(ks))
        for m in runs:
            cells = [
                f"{100 * R[m]['pass@k'][k]:.1f} / {100 * R[m]['maj@k'][k]:.1f}" if k in R[m]["maj@k"] else "—"
                for k in ks
            ]
            lines.append(f"| {m} (pass / maj) | " + " | ".join(cells) + " |")

    if per_problem:
        lines += ["", "<details><summary>Per problem accuracy (%)</summary>", ""]
        lines += ["| id | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        for pid, accs in per_problem.items():
            cells = ["—" if accs.get(m) is None else f"{100 * accs[m]:.0f}" for m in runs]
            lines.append(f"| {pid} | " + " | ".join(cells) + " |")
        lines += ["", "</details>"]

    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines.append("")
    return "\n".join(lines)


def per_problem_accuracy(records: Sequence[dict], runs: Sequence[str]) -> dict:
    table: dict[str, dict[str, float]] = {}
    for m in runs:
        for pid, rs in _by_problem([r for r in records if r["mode"] == m]).items():
            table.setdefault(pid, {})[m] = sum(bool(r["correct"]) for r in rs) / len(rs)
    return table


# --- plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kv_curves(
    records: Sequence[dict], runs: Sequence[str], ids: Sequence[str], path: Path
) -> Path | None:
    """KV cache size per generated token for chosen problems (sample 0), one line per run."""
    traced = {(r["mode"], str(r["id"])): r for r in records if r.get("kv_runs") and r["sample"] == 0}
    ids = [i for i in ids if any((m, i) in traced for m in runs)]
    if not ids:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(ids), 1, figsize=(8, 2.6 * len(ids)), squeeze=False)
    for ax, pid in zip(axes[:, 0], ids, strict=True):
        for m in runs:
            r = traced.get((m, pid))
            if r is not None:
                ax.plot(expand_trace(r["kv_runs"]), label=m, linewidth=1)
        ax.set_title(f"problem {pid}", fontsize=9)
        ax.set_ylabel("KV tokens")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("generated token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compression_cdf(records: Sequence[dict], runs: Sequence[str], path: Path) -> Path | None:
    series = {
        m: sorted(r["compression"] for r in records if r["mode"] == m and r.get("compression")) for m in runs
    }
    series = {m: v for m, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, values in series.items():
        ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=m)
    ax.set_xlabel("compression (memento / block size)")
    ax.set_ylabel("fraction of samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_maj_at_k(summary: dict, path: Path) -> Path | None:
    runs = summary["order"]
    if all(len(summary["runs"][m]["maj@k"]) < 2 for m in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in runs:
        ks = sorted(summary["runs"][m]["maj@k"], key=int)
        ax.plot(
            [int(k) for k in ks],
            [100 * summary["runs"][m]["maj@k"][k] for k in ks],
            marker="o",
            label=f"{m} maj@k",
        )
        ax.plot(
            [int(k) for k in ks],
            [100 * summary["runs"][m]["pass@k"][k] for k in ks],
            linestyle="--",
            label=f"{m} pass@k",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    output_dir: str | Path,
    records: Sequence[dict],
    *,
    benchmark: str,
    kind: str,
    problems: int,
    order: Sequence[str] = (),
    bytes_per_token: int | None = None,
    plot_ids: Sequence[str] | None = None,
    plots: bool = True,
    seed: int = 0,
    shape: KVShape | None = None,
) -> dict:
    """Write summary.json, report.md and the plots; returns the summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError(f"{out}: no results to report")
    summary = summarize(
        records,
        benchmark=benchmark,
        kind=kind,
        problems=problems,
        order=order,
        bytes_per_token=bytes_per_token,
        seed=seed,
        shape=shape,
    )
    runs = summary["order"]
    written: list[Path] = []
    if plots:
        if plot_ids is None:
            plot_ids = list(
                dict.fromkeys(str(r["id"]) for r in sorted(records, key=lambda r: r.get("problem_index", 0)))
            )[:3]
        for p in (
            plot_kv_curves(records, runs, list(plot_ids), out / "kv_curves.png"),
            plot_compression_cdf(records, runs, out / "compression_cdf.png"),
            plot_maj_at_k(summary, out / "maj_at_k.png"),
        ):
            if p is not None:
                written.append(p)
    summary["plots"] = [p.name for p in written]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    per_problem = per_problem_accuracy(records, runs) if problems <= 60 else None
    (out / "report.md").write_text(render_markdown(summary, [p.name for p in written], per_problem))
    return summary
