"""The transformers internals memento relies on, behind one small interface.

transformers changes the calling conventions between a model and its KV cache from release to
release (5.24: the cache argument is `cache=` instead of `past_key_values=`, and attention modules
call `cache.update(key, value, layer_idx, kwargs=...)`). Code elsewhere in memento asks this module
instead of assuming one release's spelling.
"""

from __future__ import annotations

import inspect
from functools import cache


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
