#!/usr/bin/env bash
# Early warning: build a throw-away venv with the newest releases pyproject.toml allows (not the
# lock), print where they differ from requirements/main.txt, and run the main test suite on them.
# Extra `name==version` arguments pin packages, e.g. to check an older release still works:
#   bash scripts/test-latest.sh                        # newest everything
#   bash scripts/test-latest.sh transformers==5.23.0   # the oldest transformers we support
# torch stays at ${TORCH:-2.13.0}: the newer torch on this machine's disk is a 5.5 GB CUDA build
# (set TORCH=2.14.1 to try it anyway).
# Environment: PYTEST_ARGS (default: the whole main suite), KEEP_VENV=1 keeps the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
[ "${KEEP_VENV:-0}" = 1 ] || trap 'rm -rf "$(dirname "$venv")"' EXIT
python3.11 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
echo "torch==${TORCH:-2.13.0}" > "$(dirname "$venv")/torch.txt"
"$venv/bin/python" -m pip install -q -c "$(dirname "$venv")/torch.txt" --upgrade --upgrade-strategy eager \
    torch -e ".[test]" "$@"
echo "== versions that differ from requirements/main.txt (lock -> now):"
join -t= -j1 \
    <(grep -v '^#' requirements/main.txt | tr A-Z a-z | sort -t= -k1,1) \
    <("$venv/bin/python" -m pip freeze --all --exclude-editable | grep -vi '^memento' | tr A-Z a-z | sort -t= -k1,1) \
    | awk -F= '$3 != $5 {print "   " $1 ": " $3 " -> " $5}'
# shellcheck disable=SC2086
"$venv/bin/python" -m pytest ${PYTEST_ARGS:-tests} -q -p no:cacheprovider
