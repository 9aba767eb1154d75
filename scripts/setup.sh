#!/usr/bin/env bash
# Create .venv in the repo root holding exactly requirements/main.txt plus memento (idempotent).
# The lock pins torch to the CPU wheel (2.13.0+cpu), so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv
fi
stamp=.venv/.memento-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/main.txt -nt "$stamp" ] \
    || [ scripts/install-locked.sh -nt "$stamp" ]; then
    bash scripts/install-locked.sh .venv requirements/main.txt
    touch "$stamp"
fi
