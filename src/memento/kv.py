"""KV accounting: how many tokens (and bytes) a generation keeps cached, with and without MEMENTO.

The one home of every KV count in the project — per-position occupancy, peak and AUC of a trace,
bytes per token of a model shape, block sizes and compression, the run-length form of traces —
used by `memento kv`, `memento eval` and the vLLM validation. Counts replay the token stream
through `memento.masking.BlockTracker`, the tracker the engine evicts with, so they equal the
engine's live trace exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memento.format import parse
from memento.masking import BlockMaskingConfig, BlockTracker, config_for_mode
from memento.tokens import MarkerIds

# --- occupancy, peak and AUC ---------------------------------------------------------------------


def _as_list(token_ids: Sequence[int]) -> list[int]:
    """Plain ints from a list or a (flattened) tensor, without importing torch here."""
    if hasattr(token_ids, "reshape"):
        token_ids = token_ids.reshape(-1).tolist()
    return [int(t) for t in token_ids]


def kv_occupancy(
    token_ids: Sequence[int], markers: MarkerIds, config: BlockMaskingConfig | None = None
) -> list[int]:
    """Cached tokens right after computing each position: `(p + 1) - |evicted spans triggered <= p|`."""
    tracker = BlockTracker(markers, config)
    occupancy = []
    for p, t in enumerate(_as_list(token_ids)):
        tracker.feed(t)
        occupancy.append(p + 1 - tracker.removed)
    return occupancy


@dataclass(frozen=True)
class KVStats:
    """KV usage of one generation. `trace[i]` = cached tokens when generated token i was sampled."""

    trace: list[int]
    peak: int
    auc: int

    @classmethod
    def from_trace(cls, trace: list[int]) -> KVStats:
        return cls(trace, max(trace, default=0), sum(trace))


def kv_stats(
    token_ids: Sequence[int], markers: MarkerIds, config: BlockMaskingConfig | None, prompt_len: int
) -> KVStats:
    """Peak and area-under-curve (token·steps) of the KV cache over the generated part."""
    ids = _as_list(token_ids)
    if not 1 <= prompt_len <= len(ids):
        raise ValueError(f"prompt_len must be between 1 and {len(ids)}, got {prompt_len}")
    occupancy = kv_occupancy(ids, markers, config)
    return KVStats.from_trace(occupancy[prompt_len - 1 : len(ids) - 1])


def replay_kv(token_ids: Sequence[int], prompt_len: int, markers, mode: str) -> tuple[int, int, list[int]]:
    """(peak, auc, trace) of one generation replayed under `mode`'s masking rule (defaults)."""
    if len(token_ids) <= prompt_len:
        return prompt_len, 0, []
    stats = kv_stats(list(token_ids), markers, config_for_mode(mode), max(prompt_len, 1))
    return stats.peak, stats.auc, stats.trace


def paged_blocks(tokens: int, block_size: int) -> int:
    """KV pages a paged cache (vLLM) holds for `tokens` cached tokens: a page stays while any of its
    `block_size` slots is in use, so the last one may be partly empty."""
    return -(-tokens // block_size)


def compress_trace(trace: Sequence[int]) -> list[list[int]]:
    """Run-length form of a KV trace: [start, length] runs that grow by one token per step.

    A sawtooth of 30k steps becomes one pair per eviction, small enough for results.jsonl."""
    runs: list[list[int]] = []
    for value in trace:
        if runs and value == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([int(value), 1])
    return runs


def expand_trace(runs: Sequence[Sequence[int]]) -> list[int]:
    return [start + i for start, length in runs for i in range(length)]


# --- bytes per token of a model shape -------------------------------------------------------------

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "fp8": 1}

# (layers, kv_heads, head_dim, dtype bytes) of common MEMENTO base models, from their configs.
PRESET_SHAPES = {
    "qwen3-8b": (36, 8, 128, 2),
    "qwen3-32b": (64, 8, 128, 2),
    "phi-4": (40, 10, 128, 2),
    "olmo-3-7b": (32, 32, 128, 2),
}
PRESETS = {
    name: 2 * layers * heads * dim * nbytes for name, (layers, heads, dim, nbytes) in PRESET_SHAPES.items()
}


def kv_bytes_per_token(model_config: str | Path | dict | None = None, preset: str | None = None) -> int:
    """`2 (K and V) x layers x kv_heads x head_dim x dtype bytes` from an HF config.json or a preset."""
    if (model_config is None) == (preset is None):
        raise ValueError("give exactly one of a model config (config.json) or a preset name")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown KV preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[preset]
    if not isinstance(model_config, dict):
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        try:
            model_config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a model config: {exc}") from exc
    cfg = model_config.get("text_config", model_config)
    try:
        layers = cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    except KeyError as exc:
        raise ValueError(f"model config lacks {exc.args[0]!r}, needed for KV bytes per token") from exc
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 2)


# --- block sizes and compression from the text ------------------------------------------------------


@dataclass(frozen=True)
class BlockStats:
    blocks: int
    block_tokens: int
    memento_tokens: int
    basis: str  # "tokens" or "chars"

    @property
    def compression(self) -> float | None:
        """Memento size per block size (lower = denser mementos); None without finished blocks."""
        return self.memento_tokens / self.block_tokens if self.block_tokens else None


def block_stats(text: str, count: Callable[[str], int] | None = None) -> BlockStats:
    """Count finished (block, memento) pairs in a response; `count` measures text in tokens."""
    trace, _problems = parse(text or "")
    pairs = [b for b in trace.blocks if b.memento.strip()]
    measure = count or len
    return BlockStats(
        blocks=len(pairs),
        block_tokens=sum(measure(b.reasoning) for b in pairs),
        memento_tokens=sum(measure(b.memento) for b in pairs),
        basis="tokens" if count is not None else "chars",
    )


# --- whole traces: full attention vs MEMENTO ---------------------------------------------------------


@dataclass(frozen=True)
class TraceKV:
    """KV usage of one generation under full attention and under MEMENTO eviction."""

    prompt_tokens: int
    generated_tokens: int
    full_peak: int
    full_auc: int
    memento_peak: int
    memento_auc: int
    blocks: int
    block_tokens: int
    memento_tokens: int
    memento_trace: list[int]
    full_trace: list[int]

    @property
    def peak_ratio(self) -> float:
        """memento / full peak KV (lower is better)."""
        return self.memento_peak / self.full_peak if self.full_peak else 1.0

    @property
    def auc_ratio(self) -> float:
        return self.memento_auc / self.full_auc if self.full_auc else 1.0

    @property
    def compression(self) -> float:
        """Memento tokens per block token."""
        return self.memento_tokens / self.block_tokens if self.block_tokens else 0.0

    def summary(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "full_peak_kv": self.full_peak,
            "memento_peak_kv": self.memento_peak,
            "peak_ratio": round(self.peak_ratio, 4),
            "full_auc_kv": self.full_auc,
            "memento_auc_kv": self.memento_auc,
            "auc_ratio": round(self.auc_ratio, 4),
            "blocks": self.blocks,
            "mean_block_tokens": round(self.block_tokens / self.blocks, 1) if self.blocks else 0.0,
            "mean_memento_tokens": round(self.memento_tokens / self.blocks, 1) if self.blocks else 0.0,
            "compression": round(self.compression, 4),
        }


def analyse(
    token_ids: Sequence[int], prompt_len: int, markers: MarkerIds, config: BlockMaskingConfig | None = None
) -> TraceKV:
    """Replay one token stream under full attention and under `config` (default keep 0)."""
    config = config or BlockMaskingConfig()
    full = kv_stats(token_ids, markers, BlockMaskingConfig.full(), prompt_len)
    memento = kv_stats(token_ids, markers, config, prompt_len)
    tracker = BlockTracker(markers, BlockMaskingConfig.full())
    tracker.feed_all(token_ids)
    done = [b for b in tracker.blocks if b.complete and b.ss is not None]
    return TraceKV(
        prompt_tokens=prompt_len,
        generated_tokens=len(token_ids) - prompt_len,
        full_peak=full.peak,
        full_auc=full.auc,
        memento_peak=memento.peak,
        memento_auc=memento.auc,
        blocks=len(done),
        block_tokens=sum(b.be - b.bs - 1 for b in done),
        memento_tokens=sum(b.se - b.ss - 1 for b in done),
        memento_trace=memento.trace,
        full_trace=full.trace,
    )


def summarize_traces(results: Sequence[TraceKV], bytes_per_token: int | None = None) -> dict:
    """Totals over several generations: the largest peaks, summed AUCs, pooled compression."""
    full_peak = max(r.full_peak for r in results)
    memento_peak = max(r.memento_peak for r in results)
    full_auc = sum(r.full_auc for r in results)
    memento_auc = sum(r.memento_auc for r in results)
    block_tokens = sum(r.block_tokens for r in results)
    out = {
        "generations": len(results),
        "full_peak_kv": full_peak,
        "memento_peak_kv": memento_peak,
        "peak_reduction": full_peak / memento_peak if memento_peak else 1.0,
        "mean_peak_ratio": sum(r.peak_ratio for r in results) / len(results),
        "full_auc_kv": full_auc,
        "memento_auc_kv": memento_auc,
        "auc_reduction": full_auc / memento_auc if memento_auc else 1.0,
        "blocks": sum(r.blocks for r in results),
        "compression": sum(r.memento_tokens for r in results) / block_tokens if block_tokens else 0.0,
    }
    if bytes_per_token:
        out["bytes_per_token"] = bytes_per_token
        out["full_peak_bytes"] = full_peak * bytes_per_token
        out["memento_peak_bytes"] = memento_peak * bytes_per_token
    return out
