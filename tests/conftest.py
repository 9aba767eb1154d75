"""Session-wide fixtures: the toy tokenizer and a saved toy checkpoint, built once and shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from memento.tokens import MarkerIds
from memento.toy import build_tokenizer, make_toy_checkpoint


@pytest.fixture(scope="session")
def toy_tokenizer():
    """The toy byte-level BPE tokenizer with all markers and the ChatML template (do not mutate)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """A directory holding a saved toy tokenizer + tiny Qwen3 model, loadable with the Auto classes."""
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy_model"), seed=0)


@pytest.fixture(scope="session")
def markers(toy_tokenizer) -> MarkerIds:
    return MarkerIds.from_tokenizer(toy_tokenizer)
