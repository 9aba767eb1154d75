"""Every transformers internal memento relies on, behind one small interface.

transformers changes its internals between releases (5.24: the cache argument became `cache=` and
attention modules call `cache.update(..., kwargs=...)`; nothing said so until a fresh clone
failed). The rest of memento uses only this module and public APIs, and `check()` runs at import:
if one of the internals below is gone or changed shape, importing `memento.hf` raises
`UnsupportedTransformers` naming it, instead of the engine computing something else silently.

What memento relies on (tested with transformers 5.23 and 5.24):

1. **Cache protocol.** `model.forward` takes its KV cache as `cache=` (5.24+) or
   `past_key_values=` (`cache_argument`). With explicit `position_ids` and a 4-D mask, attention
   modules call only `cache.update(key, value, layer_idx, ...)` on it, so the engine's own cache
   subclasses `transformers.Cache`, built with `Cache(layers=[])` (`CacheBase`).
2. **4-D masks pass through.** A 4-D attention mask given to `model(...)` reaches the attention
   function unchanged (`masking_utils` returns a prepared 4-D mask as is).
3. **Attention functions.** `AttentionInterface.register(name, fn)`; every attention module looks
   its function up by `config._attn_implementation` at each call (so `AttentionSwap` can swap it
   for one forward) and calls `fn(module, query, key, value, attention_mask, dropout=, scaling=,
   **kwargs)` with `module.layer_idx` and `module.config`; a sliding-window layer passes its
   window as `sliding_window=` (checked against ours on every call); extra keyword arguments of
   `model(...)` reach `fn` (how the per-window masks `memento_masks=` travel).
   `AttentionMaskInterface.register(name, sdpa_mask)` makes the model's own mask building accept
   our name.
4. **Layer types.** `config.layer_types` (`full_attention` | `sliding_attention`, anything else is
   refused) and `config.sliding_window`, or one `sliding_window` for every layer when there are no
   layer types (Mistral, Phi-3), as `memento.kv.layer_windows` reads them from `config.to_dict()`;
   the window rule is transformers' `k > q - W`, i.e. `memento.masking.in_window`
   (`layer_windows`).
5. **DynamicCache layers** expose `keys` / `values` as `[batch, heads, length, dim]`
   (`remove_span`, `cache_kv`); keys are stored after RoPE.
6. **Llama-family module layout** for the engine's direct forward (`decoder_parts`): `model.model`
   has `embed_tokens`, `layers`, `norm`, `rotary_emb(x, position_ids) -> (cos, sin)`; each layer
   has `self_attn.{q,k,v,o}_proj` (+ optional per-head `q_norm`/`k_norm`), `scaling`, `head_dim`,
   `input_layernorm` / `post_attention_layernorm` RMSNorms with `variance_epsilon`, and a SiLU
   `mlp.{gate,up,down}_proj`. Anything else keeps the HF forward.
7. **Embedding resize** `resize_token_embeddings(n, mean_resizing=False)` (`resize_embeddings`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, Cache, DynamicCache, PreTrainedModel

#: Releases this adapter was written and tested against (others may work; `check()` decides).
TESTED = ("5.23", "5.24")


class UnsupportedTransformers(RuntimeError):
    """An internal memento relies on is missing or changed in the installed transformers."""


def check() -> str:
    """Verify every internal listed in the module docstring that can be checked without a model;
    raise `UnsupportedTransformers` naming what changed. Returns the installed version."""
    problems = []
    if "layers" not in inspect.signature(Cache.__init__).parameters:
        problems.append("transformers.Cache(layers=...) is gone (memento.engine.cache subclasses Cache)")
    for registry in (AttentionInterface, AttentionMaskInterface):
        if not callable(getattr(registry, "register", None)):
            problems.append(f"{registry.__name__}.register is gone (attention functions)")
    try:
        from transformers.masking_utils import sdpa_mask  # noqa: F401
    except ImportError:
        problems.append("transformers.masking_utils.sdpa_mask is gone (mask function for our attention)")
    if "mean_resizing" not in inspect.signature(PreTrainedModel.resize_token_embeddings).parameters:
        problems.append("resize_token_embeddings(mean_resizing=) is gone (adding marker tokens)")
    if problems:
        raise UnsupportedTransformers(
            f"transformers {transformers.__version__} changed internals memento relies on (tested with "
            f"{', '.join(TESTED)}): " + "; ".join(problems) + ". Install a tested release "
            "(bash scripts/setup.sh installs the locked one) or update memento/hf.py"
        )
    return transformers.__version__


# --- 1. cache protocol ----------------------------------------------------------------------------


@cache
def _forward_parameters(forward_type: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(forward_type.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_argument(model) -> str:
    """The keyword `model.forward` takes its KV cache under: `cache` from transformers 5.24 on,
    `past_key_values` before (and for models that still use the old name)."""
    params = _forward_parameters(type(model))
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache_object) -> dict:
    """`{name: cache_object}` for `model(**inputs, **with_cache(model, cache))`."""
    return {cache_argument(model): cache_object}


class CacheBase(Cache):
    """Base class for a KV cache a transformers model accepts: it only has to implement
    `update(key, value, layer_idx, *args, **kwargs) -> (keys, values)` (item 1 above)."""

    def __init__(self) -> None:
        super().__init__(layers=[])


# --- 4. layer types ------------------------------------------------------------------------------

LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModel(ValueError):
    """A model memento cannot run correctly (refused at load, never run silently wrong)."""


def text_config(config):
    """The decoder's config (the config itself for a text-only model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_windows: dict[int, tuple[object, tuple[int | None, ...]]] = {}


def layer_windows(config) -> tuple[int | None, ...]:
    """Per decoder layer: None for full attention, or its sliding window `W` (query `q` sees key
    `k` only if `q - k < W`, `memento.masking.in_window`). The config is read by
    `memento.kv.layer_windows` (one reading for the engine, training and KV accounting). Raises
    `UnsupportedModel` for layer types without a per-token KV cache to evict from (linear
    attention, state-space or convolution layers, ...)."""
    from memento.kv import layer_windows as windows_from_config

    hit = _windows.get(id(config))
    if hit is not None and hit[0] is config:
        return hit[1]
    text = text_config(config)
    name = getattr(text, "model_type", type(text).__name__)
    values = text.to_dict()
    types = values.get("layer_types") or ()
    unknown = sorted({str(t) for t in types} - set(LAYER_TYPES))
    if unknown:
        where = [i for i, t in enumerate(types) if t in unknown]
        raise UnsupportedModel(
            f"{name}: layer type(s) {unknown} (layers {where}) are not supported: MEMENTO evicts "
            "per-token KV entries, which only full and sliding-window attention layers keep"
        )
    try:
        windows = tuple(None if w is None else int(w) for w in windows_from_config(values))
    except (ValueError, KeyError) as exc:
        raise UnsupportedModel(f"{name}: {exc}") from exc
    _windows[id(config)] = (config, windows)
    return windows


def check_model(config) -> tuple[int | None, ...]:
    """Refuse, with the reason, a model whose attention memento would not compute exactly (called
    on the config, before any weight is loaded); returns its `layer_windows`. Attention variants
    only visible at run time (e.g. sinks) are refused by `memento_sdpa` on the first forward."""
    windows = layer_windows(config)
    text = text_config(config)
    name = getattr(text, "model_type", type(text).__name__)
    if getattr(text, "attn_logit_softcapping", None):
        raise UnsupportedModel(
            f"{name}: attention logit soft-capping ({text.attn_logit_softcapping}) is not implemented by "
            "memento's attention (SDPA); this model is not supported"
        )
    return windows


# --- 3. the attention function ----------------------------------------------------------------------

ATTENTION_NAME = "memento_sdpa"
#: Query chunk of the causal-chunked path (full square masks: training, prefill without cache).
CHUNK = 256
#: Keyword arguments an attention module may pass that this function honours or may ignore.
_KNOWN_KWARGS = {
    "dropout",
    "scaling",
    "is_causal",
    "position_ids",
    "use_cache",
    "cache_position",
    "num_items_in_batch",
}
_ABSENT = object()


def _layer_window(module, masks: dict, declared) -> int | None:
    """This layer's window by our reading of the config, cross-checked with what the layer says."""
    config, index = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if config is None or index is None:
        if len(masks) == 1:
            return next(iter(masks))
        raise UnsupportedModel(
            f"memento: {type(module).__name__} has no config/layer_idx, so its window is unknown"
        )
    window = layer_windows(config)[index]
    if declared is _ABSENT and window is not None:
        raise UnsupportedModel(
            f"memento: layer {index} has sliding_window={window} in its config, but its attention "
            "does not declare a window: cannot tell whether it applies it"
        )
    if declared is not _ABSENT and declared != window:
        raise UnsupportedModel(
            f"memento: layer {index} attends with sliding_window={declared}, the config says {window}"
        )
    return window


def memento_sdpa(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    memento_masks=None,
    **kwargs,
):
    """The one attention function memento registers (engine and Stage-2 training): torch SDPA
    that takes a boolean or additive 4-D mask *and* broadcasts grouped KV heads (transformers' own
    sdpa path copies the KV heads whenever a mask is given), and, for a full square mask longer
    than `CHUNK` (training, prefill without cache), splits the queries into causal chunks that
    each see only their key prefix (the Stage-2 mask is causal, so the rest is masked anyway: up
    to ~2x less attention work than one masked SDPA, forward and backward).

    Sliding windows: `memento_masks` (`{window: mask}`, a `model(...)` keyword argument) gives one
    mask per window (None = full attention), and each layer takes the one for its window
    (`layer_windows`, cross-checked with the `sliding_window` the layer declares). A sliding
    layer without `memento_masks` is refused: a single 4-D mask would reach every layer alike.

    Refuses what it does not implement (logit soft-capping, attention sinks, ...) rather than
    computing something else."""
    declared = kwargs.pop("sliding_window", _ABSENT)
    if memento_masks is not None:
        window = _layer_window(module, memento_masks, declared)
        if window not in memento_masks:
            raise UnsupportedModel(
                f"memento: no mask for window {window} (layer {module.layer_idx}); got {sorted(memento_masks, key=str)}"
            )
        attention_mask = memento_masks[window]
    elif declared not in (_ABSENT, None):
        raise UnsupportedModel(
            f"memento: layer {getattr(module, 'layer_idx', '?')} has a sliding window ({declared}) but got "
            "no per-window masks (memento_masks=...): one 4-D mask would reach every layer alike"
        )
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _KNOWN_KWARGS)
    if unknown:
        raise NotImplementedError(
            f"memento: the attention of {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) "
            f"uses {unknown}, which memento's attention does not implement; this model is not supported"
        )
    gqa = query.shape[1] != key.shape[1]
    length = query.shape[2]
    causal = attention_mask is None and length > 1 and getattr(module, "is_causal", True)
    square = (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.ndim == 4
        and key.shape[2] == length
        and attention_mask.shape[-2] == length
    )
    if not square or length <= CHUNK:
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=scaling,
            enable_gqa=gqa,
        )
        return out.transpose(1, 2).contiguous(), None
    outs = []
    for start in range(0, length, CHUNK):
        end = min(length, start + CHUNK)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, :end],
                value[:, :, :end],
                attn_mask=attention_mask[:, :, start:end, :end],
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


_registered = False


def register_attention() -> str:
    """Register `memento_sdpa` (and the sdpa mask builder under the same name) with transformers;
    idempotent. Returns the name for `attn_implementation=` / `set_attn_implementation`."""
    global _registered
    if not _registered:
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, memento_sdpa)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True
    return ATTENTION_NAME


def _configs(model) -> list:
    """Every distinct config object the model's modules read their attention implementation from."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


class AttentionSwap:
    """Runs forwards of `model` with `memento_sdpa` without changing the model for anyone else:
    the attention implementation is swapped for the duration of one call only."""

    def __init__(self, model) -> None:
        self.name = register_attention()
        self.configs = _configs(model)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = self.name
        try:
            yield
        finally:
            for c, impl in zip(self.configs, saved, strict=True):
                c._attn_implementation = impl


# --- 4. stock DynamicCache --------------------------------------------------------------------------


def remove_span(cache: DynamicCache, start: int, end: int) -> None:
    """Drop physical slots `[start, end)` from every layer of a transformers `DynamicCache`
    (batch 1 or all rows alike): the compaction primitive for a stock cache."""
    if end <= start:
        return
    for layer in cache.layers:
        length = layer.keys.shape[2]
        keep = torch.cat([torch.arange(0, start), torch.arange(min(end, length), length)]).to(
            layer.keys.device
        )
        layer.keys = layer.keys.index_select(2, keep)
        layer.values = layer.values.index_select(2, keep)


def cache_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (keys, values) tensors a `DynamicCache` holds, `[batch, heads, length, dim]`
    (the tensors themselves, not copies; keys after RoPE): what `memento probe` reads."""
    return [(layer.keys, layer.values) for layer in cache.layers]


# --- 5. Llama-family layout for the direct forward -------------------------------------------------

#: Architectures whose decoder layer is exactly: RMSNorm -> attention (+ optional per-head q/k
#: RMSNorm, RoPE) -> residual -> RMSNorm -> SiLU-gated MLP -> residual. Sliding windows are the
#: engine's masks' business (`layer_windows`), not the layer math's.
DIRECT_ARCHITECTURES = ("qwen3", "qwen2", "llama", "mistral")


@dataclass(frozen=True)
class Norm:
    """An RMSNorm: `module(x)` in any dtype, or `weight`/`eps` for the fused fp32 op."""

    module: nn.Module
    weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class LayerParts:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    q_norm: Norm | None
    k_norm: Norm | None
    input_norm: Norm
    post_attention_norm: Norm
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    head_dim: int
    scaling: float


@dataclass(frozen=True)
class DecoderParts:
    """The weights of a Llama-family decoder, by role (no copies)."""

    embed: nn.Embedding
    layers: list[LayerParts]
    norm: Norm
    lm_head: nn.Linear
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _plain(module, kind: type) -> bool:
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks)


def _norm(module) -> Norm | None:
    if module is None or not hasattr(module, "weight") or not hasattr(module, "variance_epsilon"):
        return None
    return Norm(module, module.weight, float(module.variance_epsilon))


def decoder_parts(model) -> DecoderParts | None:
    """The model's decoder by role if it is exactly a supported Llama-family layout (item 5), else
    None (another architecture, hooks, accelerate dispatch, quantised or fused layers, ...)."""
    config = model.config
    if (
        getattr(config, "model_type", None) not in DIRECT_ARCHITECTURES
        or getattr(config, "hidden_act", None) != "silu"
    ):
        return None
    if getattr(config, "pretraining_tp", 1) != 1:
        return None
    if any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    lm_head = getattr(model, "lm_head", None)
    if not (_plain(base.embed_tokens, nn.Embedding) and _plain(lm_head, nn.Linear)):
        return None
    final_norm = _norm(base.norm)
    if final_norm is None:
        return None
    layers = []
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not (hasattr(attn, "scaling") and hasattr(attn, "head_dim")):
            return None
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(_plain(m, nn.Linear) for m in linears):
            return None
        norms = [
            _norm(getattr(layer, "input_layernorm", None)),
            _norm(getattr(layer, "post_attention_layernorm", None)),
        ]
        q_norm, k_norm = _norm(getattr(attn, "q_norm", None)), _norm(getattr(attn, "k_norm", None))
        if (
            None in norms
            or hasattr(attn, "q_norm") != (q_norm is not None)
            or (q_norm is None) != (k_norm is None)
        ):
            return None
        q, k, v, o, gate, up, down = linears
        layers.append(
            LayerParts(
                q, k, v, o, q_norm, k_norm, norms[0], norms[1], gate, up, down, attn.head_dim, attn.scaling
            )
        )
    return DecoderParts(base.embed_tokens, layers, final_norm, lm_head, base.rotary_emb)


# --- 6. embeddings ------------------------------------------------------------------------------


def resize_embeddings(model, rows: int) -> None:
    """Grow the input (and tied/untied output) embeddings to `rows` without mean-initialising the
    new rows (the caller initialises them; the mean pass is slow on large vocabularies)."""
    model.resize_token_embeddings(rows, mean_resizing=False)


check()
