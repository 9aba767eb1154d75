"""Evicting inference over any HF causal LM: generation with MEMENTO block eviction, continuous
batching under a KV-token budget, modes full | memento | restart."""

from memento.engine.engine import Engine
from memento.engine.sampling import SamplingParams
from memento.engine.sequence import RequestOutput

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
