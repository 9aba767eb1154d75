"""memento: MEMENTO-style block reasoning with KV eviction, from annotation to serving."""

__version__ = "0.1.0"
