"""Raw chain-of-thought traces → Memento training data (sentences, boundary scores, blocks, mementos)."""

from memento.annotate.segmentation import objective, segment
from memento.annotate.sentences import RegexTokenCounter, TokenCounter, split_sentences

__all__ = ["RegexTokenCounter", "TokenCounter", "objective", "segment", "split_sentences"]
