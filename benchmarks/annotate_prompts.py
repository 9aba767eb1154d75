"""What the annotation prompts cost, and (with an endpoint) whether the scorer should see the problem.

Offline (always), over the accepted Sky-T1 traces, with the real prompt builders and the built-in
token counter:
* scoring: the prompts' tokens with and without the problem statement, two passes (windows 16 and
  11) — the original pipeline never sends the problem;
* compressor: the input tokens of one call per trace (all blocks, the paper's) against one call
  per block (each with the problem), on the offline segmentation.

With an endpoint (`--base-url`, any OpenAI-compatible server): what it changes — every window of the
first `--traces` traces is scored both ways, and we report the scores' agreement between the two
passes of each condition (a noisier scorer agrees less with itself) and between the conditions.
There is no ground truth for boundary quality, so this is a consistency measure, not accuracy.

    .venv/bin/python benchmarks/annotate_prompts.py                      # offline cost only
    .venv/bin/python benchmarks/annotate_prompts.py --base-url http://127.0.0.1:8000/v1 \\
        --model Qwen/Qwen3-32B --api-key none --traces 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from memento.annotate.scoring import ScoringConfig, build_window_prompt, windows
from memento.annotate.sentences import RegexTokenCounter, split_sentences
from memento.annotate.sources import SourceConfig, SourceReport, iter_traces

DEFAULT_TRACES = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / "sky-t1-aime24.jsonl"
)


def prompt_cost(traces, counter) -> dict:
    """Prompt tokens of every scoring window, two passes, with and without the problem."""
    totals = {"without": 0, "with": 0}
    n_windows = 0
    for raw in traces:
        sentences = split_sentences(raw.thinking, counter)
        nb = len(sentences) - 1
        for size in (16, 11):
            for a, b in windows(nb, size):
                n_windows += 1
                for key, problem in (("without", None), ("with", raw.problem)):
                    msgs = build_window_prompt(problem, sentences, a, b)
                    totals[key] += sum(counter.count(m["content"]) for m in msgs)
    extra = totals["with"] - totals["without"]
    return {
        "traces": len(traces),
        "windows": n_windows,
        "prompt_tokens_without_problem": totals["without"],
        "prompt_tokens_with_problem": totals["with"],
        "extra_fraction": round(extra / totals["without"], 4),
    }


def compressor_cost(traces, counter) -> dict:
    """Compressor input tokens: one call with every block vs one call per block."""
    from memento.annotate.mementos import COMPRESS_SYSTEM, COMPRESS_USER, block_text, trace_prompt
    from memento.annotate.scoring import heuristic_scores
    from memento.annotate.segmentation import segment

    per_trace = per_block = blocks = 0
    for raw in traces:
        sentences = split_sentences(raw.thinking, counter)
        cuts = segment([counter.count(x) for x in sentences], heuristic_scores(sentences))
        texts = [block_text(sentences, a, b) for a, b in cuts]
        blocks += len(texts)
        per_trace += sum(counter.count(m["content"]) for m in trace_prompt(raw.problem, texts))
        system = counter.count(COMPRESS_SYSTEM)
        per_block += sum(
            system + counter.count(COMPRESS_USER.format(problem=raw.problem, block=t)) for t in texts
        )
    return {
        "blocks": blocks,
        "input_tokens_one_call_per_trace": per_trace,
        "input_tokens_one_call_per_block": per_block,
        "per_trace_over_per_block": round(per_trace / per_block, 4),
    }


def _agreement(a: list[float], b: list[float]) -> dict:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return {"boundaries": 0}
    return {
        "boundaries": len(pairs),
        "exact": round(sum(x == y for x, y in pairs) / len(pairs), 4),
        "mean_abs_diff": round(statistics.fmean(abs(x - y) for x, y in pairs), 4),
    }


async def live(traces, counter, args) -> dict:
    from memento.annotate.llm import LLMClient, LLMConfig
    from memento.annotate.scoring import llm_scores

    client = LLMClient(LLMConfig(model=args.model, base_url=args.base_url, api_key=args.api_key))
    out: dict = {}
    try:
        runs = {}
        for key, include in (("without", False), ("with", True)):
            passes, finals = [[], []], []
            for raw in traces:
                sentences = split_sentences(raw.thinking, counter)
                res = await llm_scores(client, raw.problem, sentences, ScoringConfig(include_problem=include))
                passes[0] += res.passes[0]
                passes[1] += res.passes[1]
                finals += res.scores
            runs[key] = finals
            out[f"{key}_problem: pass 16 vs pass 11"] = _agreement(*passes)
        out["with vs without (averaged scores)"] = _agreement(runs["with"], runs["without"])
    finally:
        await client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=DEFAULT_TRACES)
    ap.add_argument("--traces", type=int, default=None, help="Only the first N accepted traces.")
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--model", default="gpt-4o")
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    counter = RegexTokenCounter()
    traces = list(iter_traces(args.input, SourceConfig(), SourceReport()))[: args.traces]
    result = {"scoring": prompt_cost(traces, counter), "compressor": compressor_cost(traces, counter)}
    if args.base_url:
        result["agreement"] = asyncio.run(live(traces, counter, args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
