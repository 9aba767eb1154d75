"""Toy kit (local tokenizer + tiny model) and, alongside it, synthetic tasks.

The names below load on first use (PEP 562), so `memento.toy.cli` does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memento.toy.kit import build_tiny_model, build_tokenizer, make_toy_checkpoint, save_toy_model

__all__ = ["build_tiny_model", "build_tokenizer", "make_toy_checkpoint", "save_toy_model"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("memento.toy.kit"), name)
    raise AttributeError(f"module 'memento.toy' has no attribute {name!r}")
