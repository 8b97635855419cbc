#!/usr/bin/env bash
# One-time setup: Debian packages for the builtin domains, a virtualenv in
# .venv with the pinned requirements, and copal installed in editable mode.
# Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The builtin domains read the first four; the report test renders in chromium.
DEBIAN_PACKAGES=(python3.11-doc dict-wn fortunes manpages chromium)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    missing=()
    for package in "${DEBIAN_PACKAGES[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
else
    echo "setup: not root or no apt-get; the builtin domains and the report test need: ${DEBIAN_PACKAGES[*]}" >&2
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
echo "setup: ready (.venv/bin/copal)"
