"""Glue: the `vllm.general_plugins` entry point (validation only) and engine arguments.

The entry point runs in every vLLM process of an environment where memento is installed, also
for engines that do not use MEMENTO, so it never patches anything and never raises: it only
warns when the installed vLLM is not the pinned one. The plugin itself is switched on per engine
through `scheduler_cls` / `worker_cls` / `additional_config["memento"]` (see `engine_kwargs`).
"""

from __future__ import annotations

import logging
from typing import Any

from memento.integrations.vllm import (
    ASYNC_SCHEDULER_CLS,
    BLOCK_CAP_PROCESSOR,
    CPU_WORKER_CLS,
    GPU_WORKER_CLS,
)
from memento.integrations.vllm import SCHEDULER_CLS as SYNC_SCHEDULER_CLS
from memento.integrations.vllm.config import CONFIG_KEY, MementoVllmConfig

logger = logging.getLogger("memento.vllm")
_registered = False


def register() -> None:
    """`vllm.general_plugins` entry point: check the pinned version once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    from memento.integrations.vllm import version

    try:
        version.check()
    except version.UnsupportedVllmVersion as exc:
        logger.warning("memento vLLM plugin unavailable: %s", exc)


def engine_kwargs(
    memento: dict[str, Any] | None = None, *, device: str = "cpu", async_scheduling: bool = False
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` / `AsyncEngineArgs` that turn MEMENTO on.

    `memento` holds `additional_config["memento"]` (validated here, unknown keys raise). Prefix
    caching is switched off (the scheduler refuses it). The block-cap logits processor is added
    when `max_block_tokens > 0` (requests may still override it per request).
    """
    section = dict(memento or {})
    config = MementoVllmConfig.from_dict(section)  # validate early, in the caller's process
    if config.masking.restart_mode and async_scheduling:
        raise ValueError("memento: restart_mode needs async_scheduling=False")
    kwargs: dict[str, Any] = {
        "scheduler_cls": ASYNC_SCHEDULER_CLS if async_scheduling else SYNC_SCHEDULER_CLS,
        "worker_cls": GPU_WORKER_CLS if device == "cuda" else CPU_WORKER_CLS,
        "additional_config": {CONFIG_KEY: section},
        "enable_prefix_caching": False,
        "async_scheduling": async_scheduling,
        "logits_processors": [BLOCK_CAP_PROCESSOR],
    }
    return kwargs


def serve_flags(
    memento: dict[str, Any] | None = None, *, device: str = "cpu", async_scheduling: bool = False
) -> list[str]:
    """The same as `engine_kwargs`, as `vllm serve` command-line flags."""
    import json

    kw = engine_kwargs(memento, device=device, async_scheduling=async_scheduling)
    return [
        "--scheduler-cls",
        kw["scheduler_cls"],
        "--worker-cls",
        kw["worker_cls"],
        "--additional-config",
        json.dumps(kw["additional_config"]),
        "--no-enable-prefix-caching",
        "--async-scheduling" if async_scheduling else "--no-async-scheduling",
        "--logits-processors",
        *kw["logits_processors"],
    ]
