"""A paper-shaped serving workload (MEMENTO paper §6.1, Fig. 8), scaled down to run on a CPU.

The paper serves 240 requests of real MEMENTO generations. We have no such model here, so each
request is a token stream whose *structure* follows real traces:

* block and memento lengths: the (block, memento) pairs of the three real MEMENTO outputs in
  `../shared/data/memento-outputs` (AIME'25, GPQA, LiveCodeBench; 13 pairs, lengths in their
  `approx_tokens`), drawn with replacement, each pair kept together; the answer after the last
  block is one of their three answers;
* blocks per request: from the lengths of the 30 real long chains of thought in
  `../shared/data/traces/sky-t1-aime24.jsonl` (Sky-T1-32B on AIME'24, 800 to 38k tokens): a
  trace of L tokens gets the number of real blocks that L tokens hold, so requests vary as much
  as real reasoning lengths do (a long tail of long requests);
* scaled down: every length is divided by `token_scale` and the number of blocks by
  `block_scale` (defaults 16 and 4: a request is 1/64 of a real one; the memento/block ratio and
  the spread of lengths are kept, the 4 marker tokens per block are not scaled).

The content tokens are random ordinary ids of the toy tokenizer (the engines are teacher-forced
or forced token by token, so every system computes exactly the same streams). The prompt is a
chat header, so the block gate opens.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MEMENTO_OUTPUTS = SHARED / "memento-outputs"
SKY_T1 = SHARED / "traces" / "sky-t1-aime24.jsonl"


@dataclass(frozen=True)
class TraceShapes:
    """What we take from the real traces: (block, memento) token pairs, answers, CoT lengths."""

    pairs: list[tuple[int, int]]
    answers: list[int]
    cot_lengths: list[int]

    @property
    def mean_pair(self) -> float:
        return statistics.mean(b + m for b, m in self.pairs)


def load_shapes(shared: Path = SHARED) -> TraceShapes:
    """Read the real traces (raises FileNotFoundError naming the missing file)."""
    outputs = sorted((shared / "memento-outputs").glob("*.json"))
    if not outputs:
        raise FileNotFoundError(f"no MEMENTO outputs in {shared / 'memento-outputs'}")
    pairs, answers = [], []
    for path in outputs:
        segments = json.loads(path.read_text())["segments"]
        block = None
        for seg in segments:
            if seg["type"] == "block":
                block = seg["approx_tokens"]
            elif seg["type"] == "summary" and block is not None:
                pairs.append((block, seg["approx_tokens"]))
                block = None
            elif seg["type"] == "answer":
                answers.append(seg["approx_tokens"])
    sky = shared / "traces" / "sky-t1-aime24.jsonl"
    cot_lengths = [len(json.loads(line)["cot"]) // 4 for line in sky.read_text().splitlines() if line.strip()]
    return TraceShapes(pairs, answers, cot_lengths)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    outputs: list[list[int]]
    blocks: list[int]  # blocks per request

    def summary(self) -> dict:
        lengths = [len(o) for o in self.outputs]
        return {
            "requests": len(self.outputs),
            "output_tokens": sum(lengths),
            "output_tokens_mean": round(statistics.mean(lengths), 1),
            "output_tokens_min_max": [min(lengths), max(lengths)],
            "prompt_tokens_mean": round(statistics.mean(len(p) for p in self.prompts), 1),
            "blocks_mean": round(statistics.mean(self.blocks), 2),
            "blocks_min_max": [min(self.blocks), max(self.blocks)],
        }


def build(
    tokenizer,
    *,
    requests: int = 240,
    token_scale: float = 16,
    block_scale: float = 4,
    seed: int = 0,
    shapes: TraceShapes | None = None,
) -> Workload:
    """`requests` (prompt ids, output ids) streams: `<think>`, then per block
    `<|block_start|> text <|block_end|> <|summary_start|> memento <|summary_end|>`, then
    `</think>` and the answer (see the module docstring for where each length comes from)."""
    from memento.tokens import MarkerIds

    shapes = shapes or load_shapes()
    markers = MarkerIds.from_tokenizer(tokenizer)
    special = (
        set(tokenizer.all_special_ids) | set(markers.block_markers) | {markers.im_start, markers.assistant}
    )
    special |= {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<think>", "</think>", "user")}
    words = [i for i in range(len(tokenizer)) if i not in special]
    think, think_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    rng = random.Random(seed)

    def scaled(n: int) -> int:
        return max(1, round(n / token_scale))

    prompts, outputs, blocks = [], [], []
    for i in range(requests):
        cot = rng.choice(shapes.cot_lengths)
        n_blocks = max(1, round(cot / shapes.mean_pair / block_scale))
        out = [think]
        for _ in range(n_blocks):
            block, memento = rng.choice(shapes.pairs)
            out += [markers.block_start, *rng.choices(words, k=scaled(block)), markers.block_end]
            out += [markers.summary_start, *rng.choices(words, k=scaled(memento)), markers.summary_end]
        out += [think_end, *rng.choices(words, k=scaled(rng.choice(shapes.answers)))]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"problem {i}: reason step by step"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
        outputs.append(out)
        blocks.append(n_blocks)
    return Workload(prompts, outputs, blocks)


def kv_profile(workload: Workload, tokenizer) -> dict:
    """Per-request KV under full attention vs MEMENTO (keep 0), from `memento.kv` (exact)."""
    from memento.kv import kv_stats
    from memento.masking import BlockMaskingConfig, config_for_mode
    from memento.tokens import MarkerIds

    markers = MarkerIds.from_tokenizer(tokenizer)
    rows = {"full": [], "memento": []}
    for prompt, out in zip(workload.prompts, workload.outputs, strict=True):
        for mode in rows:
            config = config_for_mode(mode, BlockMaskingConfig())
            rows[mode].append(kv_stats(prompt + out, markers, config, len(prompt)))
    peak = {m: statistics.mean(s.peak for s in rows[m]) for m in rows}
    auc = {m: statistics.mean(s.auc for s in rows[m]) for m in rows}
    return {
        "mean_peak_kv": {m: round(v, 1) for m, v in peak.items()},
        "mean_auc_kv": {m: round(v) for m, v in auc.items()},
        "peak_ratio": round(peak["full"] / peak["memento"], 2),
        "auc_ratio": round(auc["full"] / auc["memento"], 2),
        "max_peak_kv_full": max(s.peak for s in rows["full"]),
    }
