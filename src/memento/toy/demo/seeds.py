"""Several demo runs (one per seed) side by side: each run's numbers, their mean and spread.

One seed can be lucky; the docs quote every seed. Print the markdown table with

    python -m memento.toy.demo.seeds RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# (label, how to read it from report.json, format)
COLUMNS = (
    ("control", lambda r: 100 * r["modes"]["control"]["accuracy"], "{:.1f}%"),
    ("memento", lambda r: 100 * r["modes"]["memento"]["accuracy"], "{:.1f}%"),
    ("restart", lambda r: 100 * r["modes"]["restart"]["accuracy"], "{:.1f}%"),
    ("memento well-formed", lambda r: 100 * r["modes"]["memento"]["well_formed"], "{:.1f}%"),
    ("peak KV control", lambda r: r["modes"]["control"]["peak_kv"], "{:.0f}"),
    ("peak KV memento", lambda r: r["modes"]["memento"]["peak_kv"], "{:.0f}"),
    ("peak KV ratio", lambda r: r["peak_kv_reduction"], "{:.2f}×"),
    ("CPU min", lambda r: r["total_cpu_seconds"] / 60, "{:.1f}"),
    ("wall min", lambda r: r["total_seconds"] / 60, "{:.1f}"),
)


def table(reports: list[dict]) -> str:
    """Markdown: one row per run, then the mean and the spread (min–max) of each column."""
    head = ["seed", *(label for label, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    values = [[get(r) for _, get, _ in COLUMNS] for r in reports]
    for r, row in zip(reports, values, strict=True):
        cells = [fmt.format(v) for v, (_, _, fmt) in zip(row, COLUMNS, strict=True)]
        lines.append("| " + " | ".join([str(r["seed"]), *cells]) + " |")
    columns = list(zip(*values, strict=True))
    mean = [fmt.format(statistics.fmean(c)) for c, (_, _, fmt) in zip(columns, COLUMNS, strict=True)]
    spread = [
        f"{fmt.format(min(c))} – {fmt.format(max(c))}"
        for c, (_, _, fmt) in zip(columns, COLUMNS, strict=True)
    ]
    lines.append("| mean | " + " | ".join(mean) + " |")
    lines.append("| min – max | " + " | ".join(spread) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m memento.toy.demo.seeds RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    reports = []
    for arg in args:
        path = Path(arg) / "report.json"
        if not path.is_file():
            print(f"error: {path}: no such report (is the run finished?)", file=sys.stderr)
            return 2
        reports.append(json.loads(path.read_text()))
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
