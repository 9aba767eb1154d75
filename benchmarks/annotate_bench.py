"""Speed of `memento annotate`'s CPU stages: sentence splitting (sentences/s on the shared real traces)
and segmentation time vs sentence count (100..1,000), with the original DP (spec §5.2, prefix sums,
numpy) alongside for comparison of time and objective.

    .venv/bin/python benchmarks/annotate_bench.py [--traces ../shared/data/traces/sky-t1-aime24.jsonl] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from memento.annotate.scoring import heuristic_scores
from memento.annotate.segmentation import objective, original_dp_cuts, segment
from memento.annotate.sentences import RegexTokenCounter, split_sentences
from memento.annotate.sources import split_thinking

DEFAULT_TRACES = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / "sky-t1-aime24.jsonl"
)


def bench_split(path: Path, repeats: int = 3) -> dict:
    counter = RegexTokenCounter()
    texts = [
        split_thinking(json.loads(line)["cot"])[0] for line in path.read_text(encoding="utf-8").splitlines()
    ]
    best = float("inf")
    n_sent = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n_sent = sum(len(split_sentences(t, counter)) for t in texts)
        best = min(best, time.perf_counter() - t0)
    chars = sum(len(t) for t in texts)
    return {
        "traces": len(texts),
        "chars": chars,
        "sentences": n_sent,
        "seconds": round(best, 3),
        "sentences_per_s": round(n_sent / best),
        "mb_per_s": round(chars / best / 1e6, 2),
    }


def _real_like(path: Path | None, n: int, rng: random.Random) -> tuple[list[int], list[float]]:
    """Token counts and heuristic scores of the first n sentences of the concatenated real traces
    (synthetic log-normal sizes when the shared data is absent)."""
    if path is not None and path.exists():
        counter = RegexTokenCounter()
        sents: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            sents += split_sentences(split_thinking(json.loads(line)["cot"])[0], counter)
            if len(sents) >= n:
                break
        sents = sents[:n]
        return [counter.count(s) for s in sents], heuristic_scores(sents)
    tokens = [max(1, int(rng.lognormvariate(3.3, 0.7))) for _ in range(n)]
    return tokens, [rng.choice([0, 0, 0.5, 1, 1, 1.5, 2, 2.5, 3]) for _ in range(n - 1)]


def bench_segment(path: Path | None, sizes: list[int], original_upto: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    segment([30] * 40, [1.0] * 39)  # warm-up
    for n in sizes:
        tokens, scores = _real_like(path, n, rng)
        t0 = time.perf_counter()
        blocks = segment(tokens, scores)
        ours = time.perf_counter() - t0
        row = {
            "sentences": n,
            "tokens": sum(tokens),
            "blocks": len(blocks),
            "seconds": round(ours, 3),
            "objective": round(objective(tokens, scores, blocks), 5),
        }
        if n <= original_upto:
            t0 = time.perf_counter()
            cuts = original_dp_cuts(tokens, scores, 200, 0.5, 1, max(1, sum(tokens) // 200))
            row["original_dp_seconds"] = round(time.perf_counter() - t0, 3)
            ob = list(zip([0, *cuts], [c - 1 for c in cuts] + [n - 1], strict=True))
            row["original_dp_objective"] = round(objective(tokens, scores, ob), 5)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    ap.add_argument("--sizes", default="100,200,300,400,500,600,700,800,900,1000")
    ap.add_argument(
        "--original-upto", type=int, default=1000, help="also time the original DP up to this size"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    have = args.traces.exists()
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "split": bench_split(args.traces) if have else None,
        "segment": bench_segment(
            args.traces if have else None, [int(x) for x in args.sizes.split(",")], args.original_upto
        ),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if result["split"]:
        s = result["split"]
        print(f"split: {s['traces']} traces, {s['chars']:,} chars → {s['sentences']:,} sentences in {s['seconds']} s "
              f"= {s['sentences_per_s']:,} sentences/s ({s['mb_per_s']} MB/s)")  # fmt: skip
    print("| sentences | tokens | blocks | ours (s) | J ours | original DP (s) | J original |")
    print("|---|---|---|---|---|---|---|")
    for r in result["segment"]:
        print(f"| {r['sentences']} | {r['tokens']} | {r['blocks']} | {r['seconds']} | {r['objective']} | "
              f"{r.get('original_dp_seconds', '-')} | {r.get('original_dp_objective', '-')} |")  # fmt: skip


if __name__ == "__main__":
    main()
