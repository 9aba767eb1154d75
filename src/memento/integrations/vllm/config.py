"""Plugin configuration: `additional_config["memento"]` plus per-request overrides.

Pure Python (no vLLM import) so it is importable and testable everywhere. Block semantics come
from `memento.masking.BlockMaskingConfig`; this module only adds the plugin-level keys (the master
switch and the marker tokens) and refuses unknown keys, as the masking config does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from memento.format import BLOCK_END, BLOCK_START, SUMMARY_END, SUMMARY_START
from memento.masking import BlockMaskingConfig
from memento.tokens import ASSISTANT, IM_START, MarkerIds, resolve_token_id

#: Key under `vllm_config.additional_config` and under `SamplingParams.extra_args`.
CONFIG_KEY = "memento"

#: Plugin-level keys (everything else must be a `BlockMaskingConfig` field).
_MARKER_KEYS = {
    "block_start_token": BLOCK_START,
    "block_end_token": BLOCK_END,
    "summary_start_token": SUMMARY_START,
    "summary_end_token": SUMMARY_END,
    "im_start_token": IM_START,
    "assistant_token": ASSISTANT,
}
_PLUGIN_KEYS = {"enable", "debug", *_MARKER_KEYS}
#: Keys a request may override (marker ids and the master switch are per-server).
_MASKING_KEYS = {f.name for f in fields(BlockMaskingConfig)}


@dataclass(frozen=True)
class MementoVllmConfig:
    """Server-wide plugin configuration (one per engine)."""

    enable: bool = False
    debug: bool = False
    masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig)
    marker_tokens: dict[str, str] = field(default_factory=lambda: dict(_MARKER_KEYS))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MementoVllmConfig:
        """Parse `additional_config["memento"]`; unknown keys raise (a typo must not pass silently)."""
        values = dict(values or {})
        unknown = sorted(set(values) - _PLUGIN_KEYS - _MASKING_KEYS)
        if unknown:
            raise ValueError(
                f"unknown memento option(s) {unknown} in additional_config['memento']; valid options: "
                f"{sorted(_PLUGIN_KEYS | _MASKING_KEYS)}"
            )
        enable = values.pop("enable", True)  # giving a memento section at all means "on"
        debug = values.pop("debug", False)
        if not isinstance(enable, bool) or not isinstance(debug, bool):
            raise ValueError("memento options 'enable' and 'debug' must be true or false")
        markers = dict(_MARKER_KEYS)
        for key in _MARKER_KEYS:
            if key in values:
                value = values.pop(key)
                if not isinstance(value, str | int) or isinstance(value, bool):
                    raise ValueError(f"memento option {key!r} must be a token string or id, got {value!r}")
                markers[key] = str(value)
        return cls(
            enable=enable, debug=debug, masking=BlockMaskingConfig.from_dict(values), marker_tokens=markers
        )

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> MementoVllmConfig:
        additional = getattr(vllm_config, "additional_config", None) or {}
        section = additional.get(CONFIG_KEY) if isinstance(additional, dict) else None
        if section is None:
            return cls(enable=False)
        if not isinstance(section, dict):
            raise ValueError(f"additional_config['memento'] must be a JSON object, got {section!r}")
        return cls.from_dict(section)

    def resolve_markers(self, tokenizer: Any) -> MarkerIds:
        """Marker ids via the spec's rule (integer strings are ids; else single tokens)."""
        ids: dict[str, int | None] = {}
        for key, text in self.marker_tokens.items():
            name = key.removesuffix("_token")
            token_id = resolve_token_id(tokenizer, text) if tokenizer is not None else _int_or_none(text)
            if token_id is None and name not in ("im_start", "assistant"):
                raise ValueError(
                    f"memento: marker {text!r} ({key}) is not a single token of this tokenizer; add the "
                    "markers to the model (memento.tokens.add_memento_tokens) or give its id"
                )
            ids[name] = token_id
        return MarkerIds(**ids)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"enable": self.enable, "debug": self.debug, **self.masking.to_dict(), **self.marker_tokens}


def _int_or_none(text: str) -> int | None:
    return int(text) if text.strip().isdigit() else None


def request_masking(base: BlockMaskingConfig, extra_args: dict[str, Any] | None) -> BlockMaskingConfig:
    """Per-request config: `SamplingParams(extra_args={"memento": {...}})` overrides masking keys.
    Over HTTP, `vllm_xargs` holds flat values only, so the options may also come as a JSON object
    string: `"vllm_xargs": {"memento": "{\"keep_last_n_blocks\": 1}"}`.

    Only `BlockMaskingConfig` fields may be overridden; anything else is an error naming the key.
    """
    override = (extra_args or {}).get(CONFIG_KEY)
    if not override:
        return base
    if isinstance(override, str):
        try:
            override = json.loads(override)
        except json.JSONDecodeError as exc:
            raise ValueError(f"extra_args['memento'] is not valid JSON ({exc}): {override!r}") from exc
    if not isinstance(override, dict):
        raise ValueError(f"extra_args['memento'] must be a dict of block-masking options, got {override!r}")
    bad = sorted(set(override) - _MASKING_KEYS)
    if bad:
        raise ValueError(
            f"unknown per-request memento option(s) {bad}; a request may override {sorted(_MASKING_KEYS)}"
        )
    return BlockMaskingConfig.from_dict({**base.to_dict(), **override})


def load_markers(config: MementoVllmConfig, vllm_config: Any) -> MarkerIds:
    """Resolve marker ids with the served tokenizer (all-integer marker options need none)."""
    tokenizer = None
    if not all(
        v.strip().isdigit() for k, v in config.marker_tokens.items() if not k.startswith(("im_", "assistant"))
    ):
        from transformers import AutoTokenizer

        model_config = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer, trust_remote_code=model_config.trust_remote_code
        )
    return config.resolve_markers(tokenizer)


def check_model(config: Any) -> None:
    """Refuse, before any weight is loaded, a model the plugin cannot run exactly (`config`: the
    model's HF config object or its config.json as a dict): layer types without per-token KV,
    soft-capped attention, and sliding-window layers, whose window vLLM's kernels and KV manager
    apply to physical slots: after compaction those are no longer original positions, so the
    window would silently reach further back than the model was trained with."""
    from memento.kv import layer_windows

    values = config if isinstance(config, dict) else _text_values(config)
    name = values.get("model_type", "this model")
    try:
        windows = layer_windows(values)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"memento: {name}: {exc}") from exc
    if values.get("attn_logit_softcapping"):
        raise ValueError(f"memento: {name}: soft-capped attention is not supported by block masking")
    sliding = [i for i, w in enumerate(windows) if w is not None]
    if sliding:
        raise ValueError(
            f"memento: {name} has sliding-window attention layers (window {windows[sliding[0]]} on "
            f"{len(sliding)} of {len(windows)} layers). vLLM applies windows to physical KV slots, "
            "which MEMENTO's compaction shifts, so the plugin cannot keep the window in original "
            "positions and refuses this model; use memento's own engine (memento generate / "
            "memento serve), which does"
        )


def _text_values(config: Any) -> dict[str, Any]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.to_dict()
