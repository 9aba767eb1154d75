"""Evicting inference over any HF causal LM: generation with MEMENTO block eviction, continuous
batching under a KV-token budget, modes full | memento | restart.

The names below load on first use (PEP 562), so `memento.engine.cli` and `memento --help` do not
import torch; `from memento.engine import Engine` works as before."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memento.engine.engine import Engine
    from memento.engine.sampling import SamplingParams
    from memento.engine.sequence import RequestOutput

_WHERE = {
    "Engine": "memento.engine.engine",
    "SamplingParams": "memento.engine.sampling",
    "RequestOutput": "memento.engine.sequence",
}
__all__ = ["Engine", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'memento.engine' has no attribute {name!r}")
