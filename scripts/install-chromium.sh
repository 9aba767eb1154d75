#!/usr/bin/env bash
# Install Debian's chromium for the headless dashboard test (tests/test_serve_dashboard.py), if it
# is missing. Needs root and the Debian package mirror; prints why and exits 1 when it cannot, and
# the test then skips with that reason. Browsers that download themselves do not work here.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install-chromium: chromium is missing and installing it needs root (apt-get install chromium)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: chromium is missing and this system has no apt-get" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >/tmp/install-chromium.log 2>&1 \
    || ! apt-get install -y -qq chromium >>/tmp/install-chromium.log 2>&1; then
    echo "install-chromium: apt-get could not install chromium (log: /tmp/install-chromium.log)" >&2
    exit 1
fi
command -v chromium >/dev/null 2>&1
