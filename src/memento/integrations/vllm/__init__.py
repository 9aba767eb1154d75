"""MEMENTO block masking as an out-of-tree vLLM plugin (pinned vLLM 0.32; no patched files).

Importing this package imports nothing from vLLM; the submodules `scheduler`, `worker`,
`logits` and `plugin` do (and check the pinned version first). See docs/vllm.md.
"""

SCHEDULER_CLS = "memento.integrations.vllm.scheduler.MementoScheduler"
ASYNC_SCHEDULER_CLS = "memento.integrations.vllm.scheduler.MementoAsyncScheduler"
CPU_WORKER_CLS = "memento.integrations.vllm.worker.MementoCPUWorker"
GPU_WORKER_CLS = "memento.integrations.vllm.worker.MementoGPUWorker"
BLOCK_CAP_PROCESSOR = "memento.integrations.vllm.logits:BlockLengthCapProcessor"
