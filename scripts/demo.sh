#!/usr/bin/env bash
# Set everything up (idempotent), then run the main job: `memento demo` on the built-in toy task
# (trains a tiny MEMENTO model from scratch on the CPU; extra arguments go to the demo, e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/memento demo "$@"
