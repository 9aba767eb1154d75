"""Toy kit (local tokenizer + tiny model) and, alongside it, synthetic tasks."""

from memento.toy.kit import build_tiny_model, build_tokenizer, make_toy_checkpoint, save_toy_model

__all__ = ["build_tiny_model", "build_tokenizer", "make_toy_checkpoint", "save_toy_model"]
