"""KV accounting: how many cached tokens (and bytes) a generation needs with and without MEMENTO.

Everything is derived from `memento.masking` replaying the token stream, so these numbers are the
ones the engine's live trace produces, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memento.masking import BlockMaskingConfig, BlockTracker, kv_stats
from memento.tokens import MarkerIds

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
