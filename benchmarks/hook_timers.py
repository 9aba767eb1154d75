"""What memento's own code costs per engine step, measured in the process that runs it.

Wall-clock ratios between two fresh processes move by +-40% on a loaded machine, far more than a
few-percent overhead; timing the hooks themselves does not. Each hook is wrapped (class attribute)
with a `perf_counter` accumulator, and so is the vLLM or engine method it calls, so a hook's own
cost is `outer - inner` (the wrapper adds well under a microsecond per call). Benchmark use only:
the patches live in the worker process that installs them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any


class HookTimers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _timed(self, fn: Callable, key: str) -> Callable:
        seconds, calls, clock = self.seconds, self.calls, time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[key] += clock() - start
                calls[key] += 1

        return timed

    def wrap(self, owner: type, name: str, key: str) -> None:
        """Time `owner.name` (defined on that class or inherited: then only for this class) under `key`."""
        setattr(owner, name, self._timed(getattr(owner, name), key))

    def wrap_instance(self, obj: Any, name: str, key: str) -> None:
        setattr(obj, name, self._timed(getattr(obj, name), key))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def own_costs(self, pairs: dict[str, tuple[str, str | None]], steps: int) -> dict[str, float]:
        """Microseconds per step of each hook's own work: its time minus the time of the method
        it delegates to (None: none)."""
        out = {}
        for name, (outer, inner) in pairs.items():
            if not self.calls.get(outer):  # not installed in this system (vanilla vLLM)
                continue
            own = self.seconds.get(outer, 0.0) - (self.seconds.get(inner, 0.0) if inner else 0.0)
            out[name] = round(1e6 * own / max(steps, 1), 2)
        return out


#: vLLM: memento hook -> (its timer, the timer of the vLLM method it calls)
VLLM_PAIRS = {
    "scheduler.schedule": ("memento.schedule", "vllm.schedule"),
    "scheduler._update_request_with_output": ("memento.update_output", "vllm.update_output"),
    "scheduler._reserve_prefill_lookahead": ("memento.lookahead", "vllm.lookahead"),
    "scheduler.allocate_slots (physical shim)": ("memento.allocate", "vllm.allocate"),
    "scheduler.add_request/_free_request": ("memento.add_free", "vllm.add_free"),
    "worker._update_states": ("memento.update_states", "vllm.update_states"),
    "worker._prepare_inputs": ("memento.prepare_inputs", "vllm.prepare_inputs"),
    "logits.BlockLengthCapProcessor": ("memento.cap", None),
}


def install_vllm(timers: HookTimers) -> None:
    """Call before building the `LLM` (the allocate_slots shim captures the vLLM method then)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from memento.integrations.vllm.logits import BlockLengthCapProcessor
    from memento.integrations.vllm.scheduler import MementoSchedulerMixin
    from memento.integrations.vllm.worker import MementoRunnerMixin

    for cls, prefix in ((MementoSchedulerMixin, "memento"), (Scheduler, "vllm")):
        timers.wrap(cls, "schedule", f"{prefix}.schedule")
        timers.wrap(cls, "_update_request_with_output", f"{prefix}.update_output")
        timers.wrap(cls, "_reserve_prefill_lookahead", f"{prefix}.lookahead")
        timers.wrap(cls, "add_request", f"{prefix}.add_free")
        timers.wrap(cls, "_free_request", f"{prefix}.add_free")
    for cls, prefix in ((MementoRunnerMixin, "memento"), (GPUModelRunner, "vllm")):
        timers.wrap(cls, "_update_states", f"{prefix}.update_states")
        timers.wrap(cls, "_prepare_inputs", f"{prefix}.prepare_inputs")
    timers.wrap(KVCacheManager, "allocate_slots", "vllm.allocate")
    timers.wrap(BlockLengthCapProcessor, "apply", "memento.cap")
    timers.wrap(BlockLengthCapProcessor, "update_state", "memento.cap")
    timers.wrap(GPUModelRunner, "execute_model", "step.execute_model")


def install_vllm_instance(timers: HookTimers, scheduler: Any) -> None:
    """After building the `LLM`: the plugin's allocate_slots shim is an instance attribute."""
    manager = scheduler.kv_cache_manager
    if "allocate_slots" in vars(manager):  # the memento shim (vanilla: the class method, timed already)
        timers.wrap_instance(manager, "allocate_slots", "memento.allocate")


#: engine: what the decode loop does besides the model forward
ENGINE_PAIRS = {
    "tracking (Sequence.append: BlockTracker + cap)": ("engine.append", None),
    "plan (Sequence.plan)": ("engine.plan", None),
    "evictions/recompute (Engine._execute)": ("engine.execute", None),
    "model forward (ModelRunner.decode)": ("engine.decode", None),
}


def install_engine(timers: HookTimers) -> None:
    from memento.engine.engine import Engine
    from memento.engine.runner import ModelRunner
    from memento.engine.sequence import Sequence

    timers.wrap(Sequence, "append", "engine.append")
    timers.wrap(Sequence, "plan", "engine.plan")
    timers.wrap(Engine, "_execute", "engine.execute")
    timers.wrap(ModelRunner, "decode", "engine.decode")
