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
from memento.masking import BlockMaskingConfig, BlockTracker, config_for_mode, evictions, in_window
from memento.tokens import MarkerIds

# --- occupancy, peak and AUC ---------------------------------------------------------------------


def _as_list(token_ids: Sequence[int]) -> list[int]:
    """Plain ints from a list or a (flattened) tensor, without importing torch here."""
    if hasattr(token_ids, "reshape"):
        token_ids = token_ids.reshape(-1).tolist()
    return [int(t) for t in token_ids]


def kv_occupancy(
    token_ids: Sequence[int],
    markers: MarkerIds,
    config: BlockMaskingConfig | None = None,
    window: int | None = None,
) -> list[int]:
    """Cached tokens right after computing each position `p`, on one attention layer.

    A full-attention layer (`window=None`) holds every key `k <= p` the block rule still allows:
    `(p + 1) - |evicted spans triggered at <= p|`. A sliding-window layer of `window` W holds only
    those with `p - k < W` in original positions (the window the model was pretrained with, never
    "the last W cached entries"), so an eviction shrinks it only while the block is still in reach.
    """
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must hold at least 1 key, got {window}")
    ids = _as_list(token_ids)
    n = len(ids)
    # kill[k]: the first position whose query may no longer see key k (n + 1: never evicted).
    kill = [n + 1] * n
    killed_at: dict[int, list[int]] = {}
    for ev in evictions(ids, markers, config):
        for k in range(ev.start, ev.end):
            if ev.trigger < kill[k]:
                kill[k] = ev.trigger
    for k, t in enumerate(kill):
        if t <= n:
            killed_at.setdefault(t, []).append(k)
    occupancy, held = [], 0
    for p in range(n):  # held = keys k <= p with p < kill[k] and in_window(p, k, window)
        leaving = p - window if window is not None else -1  # the key that leaves the window now
        if leaving >= 0 and kill[leaving] >= p:  # it was still held at p - 1
            held -= 1
        held -= sum(1 for k in killed_at.get(p, ()) if in_window(p, k, window))
        held += 1  # key p itself
        occupancy.append(held)
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
    token_ids: Sequence[int],
    markers: MarkerIds,
    config: BlockMaskingConfig | None,
    prompt_len: int,
    window: int | None = None,
) -> KVStats:
    """Peak and area-under-curve (token·steps) of the KV cache over the generated part, on a
    full-attention layer or (with `window`) a sliding-window one."""
    ids = _as_list(token_ids)
    if not 1 <= prompt_len <= len(ids):
        raise ValueError(f"prompt_len must be between 1 and {len(ids)}, got {prompt_len}")
    occupancy = kv_occupancy(ids, markers, config, window)
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


def compress_steps(trace: Sequence[int]) -> list[list[int]]:
    """Run-length form of any trace: [start, length, step] runs of constant step.

    For sliding-window layers, whose count stays flat once the window is full (a key leaves as one
    enters) and climbs by one while evicted keys leave it: a few runs per block."""
    runs: list[list[int]] = []
    for value in trace:
        value = int(value)
        if runs:
            start, length, step = runs[-1]
            last = start + (length - 1) * step
            if length == 1:
                runs[-1] = [start, 2, value - start]
                continue
            if value - last == step:
                runs[-1][1] += 1
                continue
        runs.append([value, 1, 0])
    return runs


def expand_steps(runs: Sequence[Sequence[int]]) -> list[int]:
    return [start + i * step for start, length, step in runs for i in range(length)]


# --- bytes per token of a model shape -------------------------------------------------------------

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "fp8": 1}
_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class KVShape:
    """What one cached token costs in a model, per attention-layer type.

    `windows` has one entry per layer: None for full attention (holds every allowed key), W for a
    sliding-window layer (holds allowed keys with `q - k < W`). Every layer stores K and V of
    `kv_heads x head_dim` values of `dtype_bytes` each."""

    name: str
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    windows: tuple[int | None, ...]
    source: str = ""

    @property
    def layers(self) -> int:
        return len(self.windows)

    @property
    def bytes_per_layer_token(self) -> int:
        """`2 (K and V) x kv_heads x head_dim x dtype bytes` for one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        """One token held by every layer (what it costs on a full-attention layer stack)."""
        return self.layers * self.bytes_per_layer_token

    def layer_counts(self) -> dict[int | None, int]:
        """How many layers have each window (None = full attention)."""
        counts: dict[int | None, int] = {}
        for w in self.windows:
            counts[w] = counts.get(w, 0) + 1
        return counts

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.windows)

    def bytes_trace(self, traces: dict[int | None, Sequence[int]]) -> list[int]:
        """Bytes held at each step, from one occupancy trace per window (`kv_occupancy(..., w)`)."""
        counts = self.layer_counts()
        length = len(next(iter(traces.values())))
        return [
            self.bytes_per_layer_token * sum(n * traces[w][i] for w, n in counts.items())
            for i in range(length)
        ]

    def describe(self) -> str:
        counts = self.layer_counts()
        parts = [f"{n} full" if w is None else f"{n} sliding ({w})" for w, n in counts.items()]
        return f"{self.layers} layers ({', '.join(parts)}), {self.kv_heads} KV heads x {self.head_dim}"


def _preset(name: str, layers: int, kv_heads: int, head_dim: int, source: str, sliding: dict | None = None):
    windows: tuple[int | None, ...] = (None,) * layers
    if sliding:  # {"window": W, "every": n}: layers whose index % n != n - 1 slide (OLMo-3's 3:1 pattern)
        every = sliding["every"]
        windows = tuple(None if i % every == every - 1 else sliding["window"] for i in range(layers))
    return KVShape(name, kv_heads, head_dim, 2, windows, source)


# The paper's models, from the fields of their public config.json (all bfloat16):
PRESET_SHAPES: dict[str, KVShape] = {
    shape.name: shape
    for shape in (
        _preset(
            "qwen3-8b",
            36,
            8,
            128,
            "Qwen/Qwen3-8B config.json: num_hidden_layers 36, num_key_value_heads 8, head_dim 128, "
            "torch_dtype bfloat16, use_sliding_window false",
        ),
        _preset(
            "qwen3-32b",
            64,
            8,
            128,
            "Qwen/Qwen3-32B config.json: num_hidden_layers 64, num_key_value_heads 8, head_dim 128, "
            "torch_dtype bfloat16, use_sliding_window false",
        ),
        _preset(
            "phi-4-reasoning",
            40,
            10,
            128,
            "microsoft/phi-4 config.json (Phi-4-reasoning is its fine-tune, model_type phi3): "
            "num_hidden_layers 40, num_key_value_heads 10, hidden_size 5120 / num_attention_heads 40 "
            "= head_dim 128, torch_dtype bfloat16, sliding_window null",
        ),
        _preset(
            "olmo-3-7b",
            32,
            32,
            128,
            "allenai Olmo-3 7B config.json (model_type olmo3): num_hidden_layers 32, "
            "num_key_value_heads 32, hidden_size 4096 / num_attention_heads 32 = head_dim 128, dtype "
            "bfloat16, layer_types 3 x sliding_attention then full_attention (24 sliding, 8 full), "
            "sliding_window 4096",
            sliding={"window": 4096, "every": 4},
        ),
    )
}
PRESET_SHAPES["phi-4"] = PRESET_SHAPES["phi-4-reasoning"]  # same architecture and shape
PRESETS = {name: shape.bytes_per_token for name, shape in PRESET_SHAPES.items()}


def layer_windows(cfg: dict) -> tuple[int | None, ...]:
    """Per-layer sliding windows (None = full attention) from an HF config, as transformers reads it:
    `layer_types` when present; else Qwen2/Qwen3's `use_sliding_window` + `max_window_layers`; else
    a `sliding_window` on every layer (Mistral, Phi-3); else full attention."""
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - _LAYER_TYPES)
        if unknown:
            raise ValueError(
                f"layer type(s) {unknown} in the model config are not supported "
                f"(supported: {sorted(_LAYER_TYPES)})"
            )
        if len(types) != layers:
            raise ValueError(f"layer_types lists {len(types)} layers but num_hidden_layers is {layers}")
        if "sliding_attention" in types and not window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        return tuple(window if t == "sliding_attention" else None for t in types)
    if not window:
        return (None,) * layers
    if "use_sliding_window" in cfg:
        if not cfg["use_sliding_window"]:
            return (None,) * layers
        first = cfg.get("max_window_layers", 0)
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers


def kv_shape(model_config: str | Path | dict | None = None, preset: str | None = None) -> KVShape:
    """The KV shape of a model, from an HF config.json (a path, its directory, or a dict) or a preset."""
    if (model_config is None) == (preset is None):
        raise ValueError("give exactly one of a model config (config.json) or a preset name")
    if preset is not None:
        if preset not in PRESET_SHAPES:
            raise ValueError(
                f"unknown KV preset {preset!r}; known presets: {', '.join(sorted(PRESET_SHAPES))}"
            )
        return PRESET_SHAPES[preset]
    name = "config"
    if not isinstance(model_config, dict):
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        name = str(path)
        try:
            model_config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a model config: {exc}") from exc
    cfg = model_config.get("text_config", model_config)
    try:
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        windows = layer_windows(cfg)
    except KeyError as exc:
        raise ValueError(f"model config lacks {exc.args[0]!r}, needed for KV bytes per token") from exc
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return KVShape(name, kv_heads, head_dim, _DTYPE_BYTES.get(dtype, 2), windows, f"{name} fields")


def kv_bytes_per_token(model_config: str | Path | dict | None = None, preset: str | None = None) -> int:
    """`2 (K and V) x layers x kv_heads x head_dim x dtype bytes` from an HF config.json or a preset
    (every layer counted as holding the token; see `KVShape` for sliding-window layers)."""
    return kv_shape(model_config, preset).bytes_per_token


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
    """KV usage of one generation under full attention and under MEMENTO eviction.

    Token counts and traces are per full-attention layer. With a model `shape`, the byte numbers
    count every layer by its type (sliding-window layers hold at most their window)."""

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
    shape: KVShape | None = None
    full_bytes: KVStats | None = None
    memento_bytes: KVStats | None = None

    @property
    def peak_ratio(self) -> float:
        """memento / full peak KV (lower is better)."""
        return self.memento_peak / self.full_peak if self.full_peak else 1.0

    @property
    def auc_ratio(self) -> float:
        return self.memento_auc / self.full_auc if self.full_auc else 1.0

    @property
    def peak_bytes_ratio(self) -> float | None:
        """memento / full peak KV bytes over all layers, by layer type (needs a shape)."""
        if self.full_bytes is None or self.memento_bytes is None:
            return None
        return self.memento_bytes.peak / self.full_bytes.peak if self.full_bytes.peak else 1.0

    @property
    def compression(self) -> float:
        """Memento tokens per block token."""
        return self.memento_tokens / self.block_tokens if self.block_tokens else 0.0

    def summary(self) -> dict:
        out = {
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
        if self.full_bytes is not None and self.memento_bytes is not None:
            out["full_peak_bytes"] = self.full_bytes.peak
            out["memento_peak_bytes"] = self.memento_bytes.peak
            out["peak_bytes_ratio"] = round(self.peak_bytes_ratio, 4)
            out["full_auc_bytes"] = self.full_bytes.auc
            out["memento_auc_bytes"] = self.memento_bytes.auc
        return out


def analyse(
    token_ids: Sequence[int],
    prompt_len: int,
    markers: MarkerIds,
    config: BlockMaskingConfig | None = None,
    shape: KVShape | None = None,
) -> TraceKV:
    """Replay one token stream under full attention and under `config` (default keep 0); with a
    model `shape`, also count bytes over all its layers, each by its attention type."""
    ids = _as_list(token_ids)
    config = config or BlockMaskingConfig()
    full_config = config_for_mode("full", config)  # same tracking (assistant gate, delimiters), no eviction
    full = kv_stats(ids, markers, full_config, prompt_len)
    memento = kv_stats(ids, markers, config, prompt_len)
    full_bytes = memento_bytes = None
    if shape is not None:
        per_window = {}
        for window in shape.layer_counts():
            if window is None:
                per_window[window] = (full.trace, memento.trace)
            else:
                per_window[window] = (
                    kv_stats(ids, markers, full_config, prompt_len, window).trace,
                    kv_stats(ids, markers, config, prompt_len, window).trace,
                )
        full_bytes = KVStats.from_trace(shape.bytes_trace({w: t[0] for w, t in per_window.items()}))
        memento_bytes = KVStats.from_trace(shape.bytes_trace({w: t[1] for w, t in per_window.items()}))
    tracker = BlockTracker(markers, full_config)
    tracker.feed_all(ids)
    done = [b for b in tracker.blocks if b.complete and b.ss is not None]
    return TraceKV(
        prompt_tokens=prompt_len,
        generated_tokens=len(ids) - prompt_len,
        full_peak=full.peak,
        full_auc=full.auc,
        memento_peak=memento.peak,
        memento_auc=memento.auc,
        blocks=len(done),
        block_tokens=sum(b.be - b.bs - 1 for b in done),
        memento_tokens=sum(b.se - b.ss - 1 for b in done),
        memento_trace=memento.trace,
        full_trace=full.trace,
        shape=shape,
        full_bytes=full_bytes,
        memento_bytes=memento_bytes,
    )


def summarize_traces(results: Sequence[TraceKV], shape: KVShape | None = None) -> dict:
    """Totals over several generations: the largest peaks, summed AUCs, pooled compression; with a
    shape, the largest peak bytes over all layers by type."""
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
    if shape is not None and all(r.full_bytes and r.memento_bytes for r in results):
        full_bytes = max(r.full_bytes.peak for r in results)
        memento_bytes = max(r.memento_bytes.peak for r in results)
        out["kv_shape"] = shape.name
        out["layers"] = shape.describe()
        out["bytes_per_token"] = shape.bytes_per_token
        out["full_peak_bytes"] = full_bytes
        out["memento_peak_bytes"] = memento_bytes
        out["peak_bytes_ratio"] = memento_bytes / full_bytes if full_bytes else 1.0
        out["mean_peak_bytes_ratio"] = sum(r.peak_bytes_ratio for r in results) / len(results)
    return out
