"""The paper's Table 1 from several `memento eval` runs: rows = models (Base, Control, MEMENTO,
+RL, ...), columns = benchmarks and benchmark groups (Comp. Math = the mean over the competition
math benchmarks), each cell accuracy (pass@1, %), peak KV (GB) and KV AUC (GB·ktok), with Δ against
a reference row (Control): points for accuracy, × for KV — as the paper writes them.

A row is `LABEL=DIRS[@MODE]`: eval output folders (a glob; one benchmark each) and the column
(`--mode`) of their results to read. `memento eval --row ... --output-dir DIR` writes table1.md
and table1.json.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memento.eval.runner import RESULTS, is_competition_math
from memento.kv import KVShape

METRICS = (("acc", "Acc (%)"), ("peak_kv_gb", "Peak KV (GB)"), ("auc_kv_gb_ktok", "AUC KV (GB·ktok)"))
COMP_MATH = "Comp. Math"


@dataclass
class RowSpec:
    label: str
    dirs: list[Path]
    mode: str | None = None


@dataclass
class Cell:
    """One row on one benchmark: the metrics and where they came from."""

    acc: float | None
    peak_kv_gb: float | None
    auc_kv_gb_ktok: float | None
    source: str
    problems: int = 0
    samples: int = 0
    members: list[str] = field(default_factory=list)  # for a group: the benchmarks averaged


def parse_row(spec: str) -> RowSpec:
    """`LABEL=PATTERN[,PATTERN...][@MODE]`; each pattern a folder or a glob of folders."""
    label, sep, rest = spec.partition("=")
    if not sep or not label.strip() or not rest.strip():
        raise ValueError(
            f"--row {spec!r}: expected LABEL=DIR[,DIR...][@MODE], e.g. 'MEMENTO=runs/memento/*@memento'"
        )
    mode = None
    if "@" in rest:
        rest, mode = rest.rsplit("@", 1)
        if not mode:
            raise ValueError(f"--row {spec!r}: empty mode after '@'")
    dirs: list[Path] = []
    for pattern in filter(None, (p.strip() for p in rest.split(","))):
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found = [Path(f) for f in found if Path(f).is_dir()]
        if not found:
            raise ValueError(f"--row {spec!r}: {pattern} matches no folder")
        dirs += found
    return RowSpec(label.strip(), dirs, mode)


def parse_group(spec: str) -> tuple[str, list[str]]:
    """`NAME=bench1,bench2,...` (benchmark names as in the eval summaries)."""
    name, sep, members = spec.partition("=")
    names = [m.strip() for m in members.split(",") if m.strip()]
    if not sep or not name.strip() or not names:
        raise ValueError(f"--group {spec!r}: expected NAME=BENCH,BENCH,... e.g. 'Comp. Math=aime24,aime25'")
    return name.strip(), names


def _read_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder}: no summary.json (not a `memento eval` output folder)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None


def load_cell(folder: Path, mode: str | None, shape: KVShape | None, seed: int = 0) -> tuple[str, Cell]:
    """(benchmark, cell) of one eval folder's run `mode`; with a `shape` the GB are recounted from
    results.jsonl by layer type, else those of the folder's own summary are used."""
    summary = _read_summary(folder)
    runs = summary.get("runs") or {}
    if mode is None:
        if len(runs) != 1:
            raise ValueError(f"{folder} holds runs {sorted(runs)}: choose one with @MODE in --row")
        mode = next(iter(runs))
    if mode not in runs:
        raise ValueError(f"{folder} has no run {mode!r} (it has {', '.join(sorted(runs))})")
    run = runs[mode]
    if shape is not None:
        from memento.eval.report import summarize_run
        from memento.jsonl import read_jsonl

        records = [r for _, r in read_jsonl(folder / RESULTS, "results file") if r.get("mode") == mode]
        run = summarize_run(records, summary.get("kind", "math"), seed=seed, shape=shape)
    cell = Cell(
        acc=100 * run["pass@1"],
        peak_kv_gb=run.get("peak_kv_gb"),
        auc_kv_gb_ktok=run.get("auc_kv_gb_ktok"),
        source=f"{folder}@{mode}",
        problems=run.get("problems", 0),
        samples=run.get("samples", 0),
    )
    return str(summary["benchmark"]), cell


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def build_table(
    rows: Sequence[RowSpec],
    *,
    groups: Sequence[tuple[str, list[str]]] | None = None,
    reference: str | None = None,
    shape: KVShape | None = None,
) -> dict:
    """Every row's cells per benchmark and per group, the column order, and the reference row.

    Default group: "Comp. Math" = every competition-math benchmark present, when there are two or
    more. A group cell is the mean of its members, shown only when the row has them all."""
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"row label given twice in {labels}: one --row per label (comma-join folders)")
    cells: dict[str, dict[str, Cell]] = {}
    benchmarks: list[str] = []
    for row in rows:
        cells[row.label] = {}
        seen: dict[str, Path] = {}
        for folder in row.dirs:
            bench, cell = load_cell(folder, row.mode, shape)
            if bench in seen:
                raise ValueError(
                    f"--row {row.label}: benchmark {bench!r} is in both {seen[bench]} and {folder}"
                )
            seen[bench] = folder
            cells[row.label][bench] = cell
            if bench not in benchmarks:
                benchmarks.append(bench)
    if groups is None:
        comp = [b for b in benchmarks if is_competition_math(b)]
        groups = [(COMP_MATH, comp)] if len(comp) >= 2 else []
    for name, members in groups:
        unknown = [m for m in members if m not in benchmarks]
        if unknown:
            raise ValueError(
                f"--group {name}: no row has benchmark {unknown[0]!r} (benchmarks: {benchmarks})"
            )
    columns = list(benchmarks)
    for name, members in groups:  # a group column right after its last member
        columns.insert(max(columns.index(m) for m in members) + 1, name)
        for label in labels:
            have = [cells[label].get(m) for m in members]
            if all(c is not None for c in have):
                cells[label][name] = Cell(
                    acc=_mean([c.acc for c in have]),
                    peak_kv_gb=_mean([c.peak_kv_gb for c in have]),
                    auc_kv_gb_ktok=_mean([c.auc_kv_gb_ktok for c in have]),
                    source="mean of " + ", ".join(members),
                    members=list(members),
                )
    if reference is None:
        reference = "Control" if "Control" in labels else labels[0]
    if reference not in labels:
        raise ValueError(f"--reference {reference!r} is not a row label ({', '.join(labels)})")
    return {
        "rows": labels,
        "columns": columns,
        "groups": {name: list(members) for name, members in groups},
        "reference": reference,
        "kv_shape": shape.describe() if shape is not None else None,
        "cells": {label: {col: vars(c) for col, c in row.items()} for label, row in cells.items()},
    }


def _value(cell: dict | None, key: str) -> str:
    v = None if cell is None else cell.get(key)
    if v is None:
        return "—"
    if key != "acc" and 0 < abs(v) < 0.1:  # toy models: keep three significant digits
        return f"{v:.3g}"
    return f"{v:.1f}" if key in ("acc", "auc_kv_gb_ktok") else f"{v:.2f}"


def _delta(cell: dict | None, ref: dict | None, key: str) -> str:
    v = None if cell is None else cell.get(key)
    base = None if ref is None else ref.get(key)
    if v is None or base is None:
        return ""
    if key == "acc":
        return f"{v - base:+.1f}"
    return f"{v / base:.2f}×" if base else ""


def render_table(table: dict) -> str:
    """Markdown in the paper's layout: per row three lines (Acc, Peak KV, AUC KV), per column
    value and Δ (rows after the reference row only)."""
    cols, ref_label = table["columns"], table["reference"]
    ref_index = table["rows"].index(ref_label)
    lines = [
        "| | | " + " | ".join(f"{c} | Δ" for c in cols) + " |",
        "|---|---|" + "---:|---:|" * len(cols),
    ]
    for i, label in enumerate(table["rows"]):
        row, ref = table["cells"][label], table["cells"][ref_label]
        for j, (key, name) in enumerate(METRICS):
            cells = []
            for c in cols:
                delta = _delta(row.get(c), ref.get(c), key) if i > ref_index else ""
                cells.append(f"{_value(row.get(c), key)} | {delta}")
            lines.append(f"| {label if j == 0 else ''} | {name} | " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Δ vs {ref_label} (rows below it): accuracy in points, KV as a ratio. Acc = pass@1 averaged over "
        "the samples of each problem; peak KV = mean over samples of the largest KV cache, in GB; "
        "AUC = mean over samples of the KV held summed over generated tokens, in GB·ktok.",
    ]
    for name, members in table["groups"].items():
        notes.append(f"{name} = mean of {', '.join(members)} (shown for rows that have all of them).")
    if table.get("kv_shape"):
        notes.append(f"KV bytes for {table['kv_shape']}.")
    sources = [
        f"- {label} / {col}: {cell['source']} ({cell['problems']} problems, {cell['samples']} samples)"
        for label in table["rows"]
        for col, cell in table["cells"][label].items()
        if not cell.get("members")
    ]
    return "\n".join(["# Table 1", "", *lines, *notes, "", "<details><summary>Sources</summary>", "",
                      *sources, "", "</details>", ""])  # fmt: skip


def write_table(output_dir: str | Path, table: dict) -> str:
    """Write table1.json and table1.md; returns the markdown."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.json").write_text(json.dumps(table, indent=2) + "\n")
    text = render_table(table)
    (out / "table1.md").write_text(text)
    return text
