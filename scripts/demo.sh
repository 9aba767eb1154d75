#!/usr/bin/env bash
# Set everything up (idempotent), then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/memento kv examples/toy-traces.jsonl "$@"
