"""Did two demo runs give the same numbers? Their report.json files minus what depends on the clock.

A seed and a thread count fix every report number (accuracy, well-formed, KV, steps, losses); only
timings, the load average and the output paths may differ. Check two runs with

    python -m memento.toy.demo.repeat A/report.json B/report.json    # exit 0: same numbers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# Keys whose values depend on the machine's speed or load, or on the output directory (and the
# label of the CPU kernels, which are compared by the numbers they produce).
CLOCK_KEYS = frozenset(
    {"seconds", "cpu_seconds", "train_seconds", "tokens_per_s", "wall_seconds", "timings_s", "total_seconds",
     "cpu_timings_s", "total_cpu_seconds", "machine", "plots", "cpu_kernels"}
)  # fmt: skip


def numbers(report: Any) -> Any:
    """`report` without the `CLOCK_KEYS` (at any depth)."""
    if isinstance(report, dict):
        return {k: numbers(v) for k, v in report.items() if k not in CLOCK_KEYS}
    if isinstance(report, list):
        return [numbers(v) for v in report]
    return report


def differences(a: Any, b: Any) -> list[str]:
    """Where two reports' numbers differ, as `path: a != b` lines (empty: the same numbers)."""
    return _diff(numbers(a), numbers(b), "")


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [line for k in sorted(set(a) | set(b)) for line in _diff(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            line for i, (x, y) in enumerate(zip(a, b, strict=True)) for line in _diff(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path or '/'}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m memento.toy.demo.repeat A/report.json B/report.json", file=sys.stderr)
        return 2
    reports = []
    for arg in args:
        path = Path(arg)
        path = path / "report.json" if path.is_dir() else path
        if not path.is_file():
            print(f"error: {path}: no such report", file=sys.stderr)
            return 2
        reports.append(json.loads(path.read_text()))
    diff = differences(*reports)
    for line in diff[:20]:
        print(line)
    print(
        f"{'same numbers' if not diff else f'{len(diff)} differences'} (timings aside): {args[0]} vs {args[1]}"
    )
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
